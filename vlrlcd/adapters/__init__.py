"""Student adapters: one StudentAdapter interface (base.py) over LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL
and text causal LMs (families.py), loaded with optional bitsandbytes 4/8-bit + peft LoRA (loader.py), tiny
random students for tests and the demo (tiny.py), and the naive per-candidate reference (naive.py)."""

from vlrlcd.adapters.quiet import quiet_libraries

quiet_libraries()
