"""The expert cache: VRAM budget and plan, host tier, GPU slots with their copy stream, and policies."""
