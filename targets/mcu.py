"""Microcontrollers: a distilled intent classifier (not an LLM) as an all-integer int8 TFLite Micro model.

The model does not come from ``--model``: the pipeline's stages for this target (``exporter.mcu.stages``)
distil a small student first, then convert, check and measure it. Budgets are per board profile: the
model's flash (flatbuffer + tokenizer tables) and its TFLite Micro tensor arena must fit the board; the
run fails otherwise. Choose a profile with ``ExportRequest.extra["board"]`` (default ``DEFAULT_BOARD``).
"""

from targets import Budgets, Target, register

KB = 1024
MB = 1024 * KB

# Board profiles: the part's on-chip flash and SRAM. The model's flash (flatbuffer + vocabulary and
# embedding tables) and its TFLite Micro tensor arena are checked against them; the firmware around
# the model shares the same memory, so a model near a limit leaves no room for the application.
BOARDS: dict[str, dict] = {
    "cortex-m0plus": {"example": "RP2040 (Raspberry Pi Pico): 2 MB QSPI flash, 264 KB SRAM",
                      "budgets": Budgets(flash_bytes_max=2 * MB, ram_bytes_max=264 * KB)},
    "cortex-m4": {"example": "STM32F4 / nRF52840: 1 MB flash, 256 KB SRAM",
                  "budgets": Budgets(flash_bytes_max=1 * MB, ram_bytes_max=256 * KB)},
    "cortex-m7": {"example": "STM32F7 / STM32H7: 2 MB flash, 512 KB SRAM",
                  "budgets": Budgets(flash_bytes_max=2 * MB, ram_bytes_max=512 * KB)},
    "esp32-s3": {"example": "ESP32-S3-WROOM-1: 8 MB external flash, 512 KB SRAM",
                 "budgets": Budgets(flash_bytes_max=8 * MB, ram_bytes_max=512 * KB)},
}
DEFAULT_BOARD = "cortex-m4"


register(Target(
    name="mcu",
    description="microcontrollers (TFLite Micro): a distilled command-intent classifier, int8-full, as C arrays",
    formats=("tflite",),
    default_recipes={"tflite": "int8-full"},
    transport="local",
    budgets=BOARDS[DEFAULT_BOARD]["budgets"],
    recipes={"tflite": ("int8-full",)},
    boards=BOARDS,
    default_board=DEFAULT_BOARD,
    stages="exporter.mcu.stages",
))
