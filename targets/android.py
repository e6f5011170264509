"""Android phones over adb: ExecuTorch ``.pte`` int4-weight (8da4w on XNNPACK), LiteRT as alternative.

The bundle is laid out the way ExecuTorch's Android LLM demo app (LlamaDemo) loads a model: the
``.pte`` and the Hugging Face ``tokenizer.json`` side by side (the app's file picker lists both from
``/data/local/tmp/llama``), plus ``android_llm.json`` with the chat template and generation settings
to copy into the app's settings screen (system prompt, prompt template, temperature, sequence length).
"""

from __future__ import annotations

import json
from pathlib import Path

from targets import Budgets, Target, register

ANDROID_SETTINGS = "android_llm.json"
DEVICE_MODEL_DIR = "/data/local/tmp/llama"  # where ExecuTorch's LlamaDemo app looks for models

def demo_prompt_templates(tokenizer) -> dict:
    """The chat template split the way the demo app's settings take it.

    LlamaDemo has a system-prompt template and a user-prompt template with ``{{ system_prompt }}``
    and ``{{ user_prompt }}`` placeholders; both are rendered from the tokenizer's own chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        return {"system_prompt_template": None, "user_prompt_template": None}
    system = {"role": "system", "content": "{{ system_prompt }}"}
    user = {"role": "user", "content": "{{ user_prompt }}"}
    try:
        head = tokenizer.apply_chat_template([system], tokenize=False, add_generation_prompt=False)
        full = tokenizer.apply_chat_template([system, user], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses a system turn, or any Jinja error: no rendering
        return {"system_prompt_template": None, "user_prompt_template": None}
    if not full.startswith(head):
        return {"system_prompt_template": None, "user_prompt_template": full}
    return {"system_prompt_template": head, "user_prompt_template": full[len(head):]}


def android_extras(loaded, out_dir: Path, artifact: str = "model.pte", max_context: int | None = None) -> list[str]:
    """Write ``android_llm.json`` (chat template + generation settings) into ``out_dir``.

    The bundle code calls this for the android target; the returned names are relative to
    ``out_dir``. ``tokenizer.json`` itself is copied by the bundle from the model folder.
    """
    tok = loaded.tokenizer
    gen = getattr(loaded.model, "generation_config", None)
    eos = []
    for e in (getattr(gen, "eos_token_id", None), tok.eos_token_id):
        for v in (e if isinstance(e, list) else [e]):
            if v is not None and int(v) not in eos:
                eos.append(int(v))
    settings = {
        "model": artifact,
        "tokenizer": "tokenizer.json",
        "device_dir": DEVICE_MODEL_DIR,
        "model_type": loaded.config.model_type,
        "chat_template": getattr(tok, "chat_template", None),
        **demo_prompt_templates(tok),
        "system_prompt": "You are a helpful assistant.",
        "bos_token_id": tok.bos_token_id,
        "eos_token_ids": eos,
        "generation": {
            "temperature": float(getattr(gen, "temperature", None) or 0.0) if getattr(gen, "do_sample", False) else 0.0,
            "top_p": float(getattr(gen, "top_p", None) or 1.0),
            "max_new_tokens": 128,
            "seq_len": int(max_context) if max_context else None,
        },
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / ANDROID_SETTINGS).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    return [ANDROID_SETTINGS]


def bundle_extras(loaded, staging: Path, spec: dict) -> None:
    """The target's bundle hook: the demo app's settings JSON beside a causal-LM ``.pte``."""
    if spec.get("format") == "pte" and spec.get("kind") == "causal-lm":
        android_extras(loaded, staging, artifact=spec["artifact"], max_context=spec.get("max_context"))


def device_precheck(runner: str, serial: str | None, fmt: str) -> None:
    """Before exporting: the format is one the runner runs, the runner binary is usable and a phone is
    attached (clear errors otherwise)."""
    from exporter.errors import SlmExportError
    from targets import adb

    if fmt != "pte":
        raise SlmExportError("--runner runs ExecuTorch programs: it needs --format pte",
                             hint="drop --format (pte is the android default) or drop --runner")
    adb.check_runner_binary(runner)
    adb.Adb(serial=serial).select()


def run_on_device(bundle_dir: Path, runner: str, serial: str | None, name: str, **options) -> dict:
    """Push the staged bundle and ``runner`` over adb, run it, return the device's latency figures."""
    from targets import adb

    return adb.measure_on_device(bundle_dir, runner, serial=serial, name=name, **options)


register(Target(
    name="android",
    description="Android phone over adb: ExecuTorch .pte int4-weight (XNNPACK), tflite alternative",
    formats=("pte", "tflite"),
    default_recipes={"pte": "int4-weight", "tflite": "int8-dynamic"},
    transport="adb",
    # SmolLM2-135M 8da4w on a mid-range arm64 phone (4 big cores): budgets for a usable chat,
    # not measured limits.
    budgets=Budgets(decode_tok_s_min=15.0, ttft_ms_max=1500.0, peak_rss_mb_max=768.0),
    bundle_extras=bundle_extras,
    on_device_precheck=device_precheck,
    on_device=run_on_device,
))


