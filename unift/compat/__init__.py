"""Patches of other libraries (torch, transformers, peft, bitsandbytes, deepspeed), each applied by an
explicit call."""
