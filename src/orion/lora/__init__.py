"""LoRA adapters passed to programs as inputs: adapters as data, the slot layout programs are built for, and PEFT's
file format. The models host adapters (``load_adapter``/``set_adapter``); training makes them."""

from orion.lora.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Adapter,
    AdapterError,
    AdapterSpec,
    LoraLayout,
    LoraModule,
    new_adapter,
    parse_peft,
    peft_files,
)

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "Adapter", "AdapterError", "AdapterSpec", "LoraLayout", "LoraModule",
           "new_adapter", "parse_peft", "peft_files"]
