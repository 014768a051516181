"""The DeepSeek-V2/V3 model: rope.py, attention.py (MLA, MHA), moe.py, mtp.py, transformer.py."""
