"""LoRA fine-tuning of a checkpoint on a text file; saves the adapters and a merged model.

Run:  python examples/finetune.py path/or/hub-id --text my.txt --out finetuned/ [--steps 200 --rank 8]
      python examples/finetune.py                (a tiny random model, trained on this file's own text)
      python examples/finetune.py ... --pack     (whole paragraphs packed end to end, no padding)

Every kind of linear layer gets an adapter (ssmblocks.training.lora_targets). By default a step trains on
--batch random windows of --seq-len tokens; with --pack, on random paragraphs (cut to --seq-len) laid end to
end in one row of up to --batch x --seq-len tokens, their bounds in ``cu_seqlens``: each paragraph starts from
a fresh state and no paragraph predicts the next one's first token. Uses the checkpoint's
tokenizer.json when it has one, bytes otherwise. Writes out/adapters (PEFT's format) and out/merged (a
checkpoint ssmblocks.from_pretrained reads; transformers too where the family allows).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

import ssmblocks
from ssmblocks.training import lora_targets


def demo_checkpoint() -> str:
    recipe = ssmblocks.Recipe(
        name="tiny-mamba2",
        vocab_size=256,
        d_model=64,
        n_layers=2,
        mixers={"m": {"kind": "ssd", "d_state": 16, "head_dim": 16}},
        pattern="m m",
    )
    folder = tempfile.mkdtemp(prefix="ssmblocks-finetune-")
    ssmblocks.save_pretrained(ssmblocks.build(recipe), folder, format="hf")
    return folder


def encode(model, text: str) -> torch.Tensor:
    if model.tokenizer is not None:
        return torch.tensor(model.tokenizer.encode(text).ids)
    if model.recipe.vocab_size < 256:
        raise SystemExit("finetune: no tokenizer.json and a vocabulary too small for bytes")
    return torch.tensor(list(text.encode("utf-8")))


def pack(paragraphs: list[torch.Tensor], budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random paragraphs laid end to end, up to ``budget`` tokens: ids (1, t) and cu_seqlens (n + 1,) int32."""
    chosen, total = [], 0
    for i in torch.randperm(len(paragraphs)).tolist():
        if total + paragraphs[i].numel() <= budget:
            chosen.append(paragraphs[i])
            total += paragraphs[i].numel()
    lengths = torch.tensor([p.numel() for p in chosen])
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return torch.cat(chosen)[None], cu_seqlens.to(chosen[0].device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="folder or hub id (default: a tiny random model)")
    parser.add_argument("--text", default=__file__, help="a UTF-8 text file to train on")
    parser.add_argument("--out", default="finetuned")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pack", action="store_true", help="train on whole paragraphs packed end to end")
    args = parser.parse_args(argv)

    import peft

    torch.manual_seed(0)
    model = ssmblocks.from_pretrained(args.checkpoint or demo_checkpoint(), device=args.device)
    text = Path(args.text).read_text(encoding="utf-8")
    tokens = encode(model, text).to(args.device)
    if tokens.numel() <= args.seq_len + 1:
        raise SystemExit(f"finetune: {args.text} has {tokens.numel()} tokens, fewer than --seq-len {args.seq_len}")
    paragraphs = [encode(model, p)[: args.seq_len].to(args.device) for p in text.split("\n\n") if p.strip()]
    targets = lora_targets(model)  # before get_peft_model, which wraps each target in LoRA modules
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets)
    lora = peft.get_peft_model(model, config).train()
    trainable = [p for p in lora.parameters() if p.requires_grad]
    print(f"LoRA on {targets}: {sum(p.numel() for p in trainable):,} trainable parameters")
    opt = torch.optim.AdamW(trainable, lr=args.lr)

    bar = tqdm(range(args.steps), desc="fine-tuning")
    for _ in bar:
        if args.pack:
            batch, cu_seqlens = pack(paragraphs, args.batch * args.seq_len)
            loss = lora(batch, labels=batch, cu_seqlens=cu_seqlens).loss
        else:
            starts = torch.randint(0, tokens.numel() - args.seq_len, (args.batch,)).tolist()
            batch = torch.stack([tokens[s : s + args.seq_len] for s in starts])
            loss = lora(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")

    out = Path(args.out)
    lora.save_pretrained(out / "adapters")
    merged = lora.merge_and_unload().eval()
    try:
        ssmblocks.save_pretrained(merged, out / "merged", format="hf")
    except ssmblocks.CheckpointError:  # a hybrid transformers cannot hold
        ssmblocks.save_pretrained(merged, out / "merged", format="ssmblocks")
    print(f"final loss {loss.item():.3f}; adapters in {out / 'adapters'}, merged model in {out / 'merged'}")


if __name__ == "__main__":
    main()
