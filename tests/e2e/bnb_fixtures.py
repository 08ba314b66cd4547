"""Make the QLoRA fixtures and their references with transformers + bitsandbytes.

Run as a script by test_bnb.py in a Python that has bitsandbytes on its path (the tests
themselves run without it): `python bnb_fixtures.py ROOT`. Writes under ROOT:
  base16/           a tiny Llama in bfloat16 (random weights)
  lora/             a PEFT LoRA made on base16, init_lora_weights=False
  CASE/base/        base16 loaded with BitsAndBytesConfig(CASE) and saved (save_pretrained)
  CASE/peft.safetensors     transformers' dequantize() of CASE/base, then PEFT's
                            merge_and_unload(): the reference (rounds twice)
  CASE/dequant.safetensors  dequantize()'s state before the merge (the model's dtype)
  CASE/w32.safetensors      each quantized weight as bitsandbytes dequantizes it in float32
  CASE/logits.safetensors   the reference's logits on INPUT_IDS
"""

import sys
import warnings
from pathlib import Path

import torch

CASES = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "int8": dict(load_in_8bit=True),
    # Saved in shards of 20 KB: a weight's quant-state tensors can sit in another shard.
    "nf4-dq-sharded": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
}
SHARD_SIZE = {"nf4-dq-sharded": "20KB"}
INPUT_IDS = [[1, 5, 9, 33, 2, 17, 60, 4]]


def use_bnb_reference_dequantize():
    """Make bitsandbytes dequantize 4-bit weights on the CPU with its own pure-torch code
    (backends/default). Its native CPU kernel (0.50.2) disagrees with that code on AVX-512
    CPUs when a 64-value block crosses a row (these fixtures' rows are 48 and 96 values):
    seen on an Intel Xeon on 2026-12-06, up to 0.04 on values of 0.27, and lorafs agreed
    bit for bit with the pure-torch code and with a plain decoding of the codes. The stored
    codes, absmax and quant map are the same either way. One difference of the pure-torch
    code is kept out: its FP4 table decodes code 8 as +0.0 where the native kernels give
    -0.0 (sign bit set, magnitude 0), which these fixtures keep."""
    import torch
    from bitsandbytes._ops import register_kernel
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    @register_kernel("bitsandbytes::dequantize_4bit", "cpu")
    def _(A, absmax, blocksize, quant_type, shape, dtype):
        A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        code = _get_4bit_code(quant_type, A.device)
        if quant_type == "fp4":
            code = code.clone()
            code[8] = -0.0
        return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)


def w32(model) -> dict:
    """Each quantized weight dequantized by bitsandbytes into float32 (its quant_state's
    dtype changed to float32: the f32 values before any rounding to the model's dtype)."""
    import bitsandbytes as bnb

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            saved, qs.dtype = qs.dtype, torch.float32
            out[name + ".weight"] = bnb.functional.dequantize_4bit(module.weight.data, qs).contiguous()
            qs.dtype = saved
        elif isinstance(module, bnb.nn.Linear8bitLt):
            scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            out[name + ".weight"] = bnb.functional.int8_vectorwise_dequant(module.weight.data, scb).contiguous()
    return out


def main(root: Path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    warnings.simplefilter("ignore")
    use_bnb_reference_dequantize()
    torch.manual_seed(0)
    # Row lengths of 48 and 96: several 64-value blocks per row, blocks across rows.
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, dtype="bfloat16",
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "base16")
    model = AutoModelForCausalLM.from_pretrained(root / "base16")
    lora = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
    )
    get_peft_model(model, lora).save_pretrained(root / "lora")
    for case, kwargs in CASES.items():
        out = root / case
        q = AutoModelForCausalLM.from_pretrained(
            root / "base16", quantization_config=BitsAndBytesConfig(**kwargs), device_map="cpu"
        )
        q.save_pretrained(out / "base", max_shard_size=SHARD_SIZE.get(case, "5GB"))
        q = AutoModelForCausalLM.from_pretrained(out / "base", device_map="cpu")
        save_file(w32(q), out / "w32.safetensors")
        q = q.dequantize()
        save_file({k: v.contiguous() for k, v in q.state_dict().items()}, out / "dequant.safetensors")
        merged = PeftModel.from_pretrained(q, root / "lora").merge_and_unload().eval()
        state = {k: v.contiguous() for k, v in merged.state_dict().items()}
        save_file(state, out / "peft.safetensors")
        with torch.no_grad():
            logits = merged(torch.tensor(INPUT_IDS)).logits.float()
        save_file({"logits": logits.contiguous()}, out / "logits.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
