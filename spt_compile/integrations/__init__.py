"""Glue for training frameworks. Each module here imports its framework; `import spt_compile` never
imports them (so the core stays free of Hugging Face dependencies)."""
