"""Team workflow: DVC remotes, experiment tables, pull-request reports, offline plot pages."""
