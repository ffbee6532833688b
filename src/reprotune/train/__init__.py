"""Training: fine-tuning methods, the Trainer loop, fine-tuned model folders, packing, packed attention, the memory-lean loss and speed switches."""
