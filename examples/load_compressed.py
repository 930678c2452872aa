"""Load an exported (compressed) prefix and generate with it; optionally check the PEFT export agrees.

    rlprefix run configs/quickstart.yaml          # writes runs/quickstart/prefix_compressed
    python examples/load_compressed.py runs/quickstart
"""
import sys
from pathlib import Path


import rlprefix
from rlprefix.models.decoder_only import forward


def main(run_dir: str = "runs/quickstart"):
    run = Path(run_dir)
    model, tokenizer = rlprefix.load_model()
    prefix = rlprefix.load_prefix(run / "prefix_compressed", model)  # checks the base-model fingerprint
    print(f"{prefix.kind} prefix, ranks {sorted(set(prefix.ranks))}, {prefix.compression_ratio():.1f}x smaller "
          f"than the full K/V ({prefix.nbytes()} bytes)")
    prompts = ["Write a one-sentence review of a motel.", "Write a one-sentence review of a printer."]
    for p, text in zip(prompts, rlprefix.generate(model, tokenizer, prompts, prefix.merge(model), seed=0,
                                                  max_new_tokens=48)):
        print(f">>> {p}\n{text.strip()}\n")

    peft_dir = run / "export_peft"
    if peft_dir.exists():
        try:  # optional: the comparison with PEFT runs only when peft is installed
            from peft import PeftModel
        except ImportError:
            return
        ids = tokenizer(prompts[:1], return_tensors="pt")
        ours = forward(model, ids["input_ids"], ids["attention_mask"], prefix).logits
        theirs = PeftModel.from_pretrained(model, peft_dir)(**ids).logits
        print(f"PEFT adapter vs rlprefix: max |logit difference| = {(ours - theirs).abs().max().item():.2e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
