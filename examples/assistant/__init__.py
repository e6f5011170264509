"""Smart assistant: chat with memory (SmolLM2 chat template) and a drone / IoT command mode."""
