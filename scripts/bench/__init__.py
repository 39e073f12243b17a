"""End-to-end LoRA/QLoRA training steps: fusetune against its peers, side by side, one subprocess each.

Variants (each in its own subprocess, so memory peaks and monkey-patches never leak between them):

- ``hf``: plain transformers + PEFT, SDPA attention, bitsandbytes for 4-bit; LoRA and gradient
  checkpointing set up the way TRL's SFTTrainer does (non-reentrant; LoRA weights cast to bf16 on a
  4-bit base);
- ``liger``: the ``hf`` model with Liger Kernel's patch for its family applied before LoRA
  (``_apply_liger_kernel_to_instance``: the family's own defaults, e.g. RoPE, RMSNorm, SwiGLU or GeGLU, with
  fused linear cross-entropy); a family Liger has no patch for is a skipped row;
- ``unsloth``: ``FastLanguageModel.from_pretrained`` + ``get_peft_model(use_gradient_checkpointing="unsloth")``,
  in a process that imports unsloth before transformers and sees ``--unsloth-site`` first on its path;
- ``fusetune_reference`` / ``fusetune_triton``: ``FastModel.from_pretrained(kernels=...)`` +
  ``FastModel.get_peft_model(use_gradient_checkpointing="unsloth")``.

Every variant trains the same model: real shapes (src/fusetune/assets/archs) with random weights, saved once
under ``--scratch`` with a tokenizer (Unsloth needs a local folder with one), the language model alone for a
multimodal architecture (Gemma 3 4B, Qwen3.5); LoRA r=16, alpha=16, dropout 0 on q,k,v,o,gate,up,down
(Phi-3: qkv, o, gate_up, down); bf16 under autocast (as the HF Trainer runs with ``bf16=True``); torch's fused
AdamW; ``model.train()``; the same seeded batches; and a plain loop (forward with labels, backward,
optimizer step, zero_grad). LoRA B starts at zero, so the first-step losses must agree across variants.

Scenarios (``--scenarios``, default all): S1 Llama-3.2-1B 8x2048; S2 Llama-3.1-8B 4x2048; S3 the 8B as QLoRA
(NF4, double quantization, bf16 compute) 4x2048, also timed with bitsandbytes' 8-bit AdamW; S4 the 1B on 8
documents a step of seeded lognormal lengths (mean ~600, cap 2048), 6 warm-up and 24 timed steps, padding-free
where the variant can; long1b / long8b 1x65,536; S5 the longest batch-1 context that trains one 8B QLoRA step,
found by probes (one subprocess each) between ``--s5-min`` and ``--s5-max``; ``--s5-memory-gib`` caps each
probe at a smaller card's memory, and then ``--s5-together`` probes all variants at once. New families, 8x2048
LoRA: S6 Qwen3.5-2B (three of four layers gated delta-net), S7 Gemma 3 4B (text), S8 Phi-4-mini; S9 Phi-4-mini
as QLoRA. S10: mixture of experts, Qwen3-30B-A3B's shapes at 24 of its 48 layers, 4x2048, LoRA on attention and
on every layer's 128 experts (PEFT ``target_parameters``; hf runs transformers' default experts_implementation,
grouped_mm in 5.x, recorded in the row). fusetune rows record ``self_check_s``, the load-time self-check of its
patched ops. D1 (Llama-3.2-1B) and D8 (Llama-3.1-8B): DPO with LoRA through each variant's own trainer (hf:
TRL's DPOTrainer; liger: with ``use_liger_kernel=True``; unsloth: after ``PatchDPOTrainer()``; fusetune:
FastDPOTrainer), 4 pairs a step of a 512-token prompt and a chosen and a rejected 1,536-token completion (seeded
random ids, 8 sequences of 2,048 tokens), beta 0.1, loss_type sigmoid, the reference the policy with its adapters
disabled; the loop calls the trainer's compute_loss in place of the forward with labels (bench.preference says
how). Their rows keep the trainers' logged log-probs per step (``dpo_metrics``): the loss at step 1 is ln 2 for
every variant, since the policy starts as its reference.

Measures: CUDA events around every step; ``step_ms`` the median of the measured steps after warm-up;
``tok_s`` tokens per step over the median step (S4: real tokens over the summed step time, since its
shapes vary; its rows also give ``tok_s_median_step`` and ``median_over_whole``, their ratio, and the
warm-up steps' times, ``step_paths`` and the graphs' counts; D1/D8: the chosen and rejected tokens the policy's
forward takes, the reference's forward over them not counted); fusetune's padding-free steps replay CUDA
graphs as FastSFTTrainer's do (``--fusetune-graphs``), with autocast inside the forward as accelerate
puts it; ``peak_gib`` ``torch.cuda.max_memory_allocated`` after a reset at the start of timing
(``peak_load_gib``: from process start, model load included); ``mfu`` useful FLOPs over a bf16 matmul
peak measured once per run (8192^3 ``torch.mm``). Useful FLOPs, per token: 4N for a frozen base (2N
forward, 2N for the input gradients; N = the parameters of every matmul, lm_head included, the
embedding lookup excluded), plus attention: 6 * layers * heads * head_dim * (L + 1) per token of a
document of length L (causal QK^T and PV, forward and input gradients). Recomputation by gradient
checkpointing is not useful work and is not counted; LoRA's own matmuls are left out. A sliding-window
layer counts the keys its window reaches; a linear-attention layer counts its projections only. DPO adds the
reference's forward: 1.5 times the policy's useful FLOPs.

Writes ``<out>/<date>-<gpu>-peers.jsonl`` (one row per scenario x variant, appended as each finishes)
and the markdown table beside it (re-rendered after every row), ratios against the best peer of hf,
liger and unsloth.

    python scripts/bench.py --scenarios S1,S4 --variants hf,liger,unsloth,fusetune_triton
    python scripts/bench.py --scenarios D1,D8 --variants hf,liger,unsloth,fusetune_triton      # DPO
    python scripts/bench.py --tiny --variants hf,fusetune_reference --out /tmp/bench   # CPU smoke test
    python scripts/bench.py --render a.jsonl b.jsonl --out bench/results                # merge calls
    python scripts/bench.py --readme-table bench/results                                # README table

``--tiny`` runs S1, S4 and D1 on the embedded tiny Llama, and S6-S10 on their architectures shrunk to toy size
(``fusetune.tiny.shrunk``), on the CPU in fp32 (S9, 4-bit, is skipped there). liger and fusetune_triton
are reported as skipped there (Triton kernels: the CPU interpreter is far too slow for training steps,
and tests/kernels covers them); unsloth, where installed, runs its own CPU fallback.
"""
# One module per part (see the README's layout section):
#   __main__   entry: a job subprocess (--worker, --prepare, --gpu-info) or the command line (cli)
#   cli        options, and the run: every scenario x variant, one row each
#   scenarios  what each scenario trains, the variants, LoRA, how each variant checkpoints
#   shapes     model shapes, LoRA targets and useful FLOPs (the parent only: it imports fusetune)
#   runner     the subprocesses: one at a time, a timeout each, an overall --budget
#   rows       the row each (scenario, variant) starts from, and the spec its subprocess runs
#   fixed, docs, max_context, dpo   one module per scenario kind (batch x seq; S4's documents; S5's probes;
#              D1/D8's preference pairs)
#   folders    the model folders the scenarios load (random weights from a shipped config)
#   worker, variants, steps    inside a subprocess: build one variant's model, train and time it
#   preference inside a DPO job: the synthetic pairs, the variant's DPO trainer, its checked batches
#   report     the markdown tables and the README's table
