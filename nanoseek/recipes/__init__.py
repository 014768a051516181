"""Recipes built on the library: ``demo`` (SFT, GRPO and a continued-SFT baseline on Countdown) and ``r1``
(DeepSeek-R1's pipeline on GSM8K-style problems). They share ``runner``: recorded stages, held-out sets,
checkpoint evaluation, SFT and GRPO stages, and the tables and report."""
