"""--plan against independent computations: parameter counts against a real model (trainable.prepare_model) and
PEFT's count, activations against bench/dpo_step.py's profiler, FLOPs against torch's FlopCounterMode; and
LLaVA-1.5-7B's real shapes on the meta device."""
import os
import re
import sys

import pytest
import torch

import lora
import plan
import plan_costs
import trainable
import train_ddp
import vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import dpo_step  # noqa: E402
import measure  # noqa: E402

LLAVA_7B = os.path.join(ROOT, "configs", "llava-1.5-7b-hf")
LLAVA_13B = os.path.join(ROOT, "configs", "llava-1.5-13b-hf")


@pytest.mark.parametrize("lora_r,train_projector,train_vision", [(8, False, False), (4, True, False), (0, False, True)])
def test_counts_equal_a_real_model(toy_world, one_thread, lora_r, train_projector, train_vision):
    model_dir = os.path.join(toy_world, "model-sft")
    real, _ = trainable.prepare_model(model_dir, torch.device("cpu"), None, "dpo", lora_r, 2.0 * lora_r,
                                      train_projector=train_projector, train_vision=train_vision)
    meta = plan.meta_model(model_dir, lora_r, 2.0 * lora_r, train_projector=train_projector, train_vision=train_vision)
    assert plan.parameter_counts(meta) == plan.parameter_counts(real)
    trained = lambda model: [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained(meta) == trained(real)
    assert sum(c[0] for c in plan.parameter_counts(meta).values()) == sum(p.numel() for p in real.parameters())


def test_lora_count_equals_peft_on_llava_7b():
    """PEFT's own LoRA on the same meta-device LLaVA-1.5-7B with the same targets: the same trainable count, and
    the hand formula r (in + out) per adapted layer: 32 layers x (4 x (4096 + 4096) + 3 x (4096 + 11008))."""
    import peft
    ours = plan.parameter_counts(plan.meta_model(LLAVA_7B, 1024, 2048))
    model = plan.meta_model(LLAVA_7B)
    config = peft.LoraConfig(r=1024, lora_alpha=2048, target_modules=vlm.lora_targets(model))
    model = peft.get_peft_model(model, config, low_cpu_mem_usage=True)  # its adapters on the meta device too
    theirs = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ours["LoRA"][0] == theirs == 32 * 1024 * (4 * (4096 + 4096) + 3 * (4096 + 11008)) == 2_558_525_440
    assert sum(c[1] for c in ours.values()) == theirs


def test_llava_7b_real_shapes():
    """What a run does to LLaVA-1.5-7B, on the meta device: LoRA on exactly the language model's 224 linear
    layers, vision tower and projector frozen, 32 FSDP2 units, 576 image tokens, 7.06 B parameters."""
    model = plan.meta_model(LLAVA_7B, 1024, 2048)
    names = [name for name, _ in lora.lora_modules(model)]
    expected = [f"model.language_model.layers.{i}.{kind}" for i in range(32)
                for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert names == expected
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not re.search(r"lora_[AB]|\.base$", name)]
    assert "lm_head" in linears and all(not name.startswith("model.language_model") for name in linears)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{n}.lora_{x}.weight" for n in expected for x in "AB"}
    units, layer_params, root_params = plan.fsdp_units(model)
    assert units == [f"model.language_model.layers.{i}" for i in range(32)]
    # a layer's base weights and two norms, and its LoRA; the root: vision tower, projector, embeddings, lm_head
    assert layer_params == 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096 + 1024 * (4 * 8192 + 3 * 15104)
    assert root_params == 303_507_456 + 20_979_712 + 2 * 32064 * 4096 + 4096
    shapes = plan_costs.shapes_of(model, vlm.spec(model))
    assert shapes.image_tokens == 576 == model.config.image_seq_length
    counts = plan.parameter_counts(plan.meta_model(LLAVA_7B))
    assert round(sum(c[0] for c in counts.values()) / 1e9, 2) == 7.06


def test_plan_command_llava_7b_and_13b(capsys):
    """The README's command: a table and a verdict; a 40 GB machine gets changes, the last of which fits."""
    common = ["--plan", "--lora-r", "1024", "--lora-alpha", "2048", "--batch-size", "16", "--gradient-checkpointing",
              "--parallel", "fsdp", "--pairs", "no-such-file.jsonl"]
    result = train_ddp.train(train_ddp.parse_args(common + ["--model", LLAVA_7B, "--nproc-per-node", "8"]))
    assert result["counts"]["LoRA"][0] == 2_558_525_440 and result["fits"]
    assert "FITS" in capsys.readouterr().out
    small = train_ddp.train(train_ddp.parse_args(common + ["--model", LLAVA_13B, "--nproc-per-node", "8",
                                                           "--gpu-memory", "40"]))
    assert not small["fits"] and small["recommended"] is not None
    assert small["recommended"]["batch"] * small["recommended"]["grad_accum"] == 16  # the global batch kept


def test_seva_plan(capsys):
    import seva
    result = seva.main(["--plan", "--model", LLAVA_7B, "--batch-size", "32", "--gpu-memory", "80"])
    shapes = plan_costs.shapes_of(plan.meta_model(LLAVA_7B), vlm.FAMILIES["llava"])
    # keys and values, 32 layers x 4096 wide, bf16, 32 sequences of prompt (576 + 64) + 512 tokens
    assert result["lines"]["KV cache (32 x 1152 tokens)"] == 2 * 32 * 4096 * 2 * 32 * 1152
    assert result["lines"]["weights"] == 2 * 7_063_427_072 and result["fits"]
    assert shapes.kv_width == 4096 and "TFLOP per instance" in capsys.readouterr().out


# ----------------------------------------------------------------------------- against measurements
def small_model(width, layers, rank, checkpointing, attention="sdpa"):
    args = dpo_step.parse_args(["--width", str(width), "--layers", str(layers), "--lora-r", str(rank),
                                "--image-size", "48", "--patch-size", "4", "--vision-width", "64",
                                "--attention", attention])
    model = dpo_step.build_model(args, torch.device("cpu"))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return args, model


# (width, layers, rank, pairs, answer tokens): none of them the configurations BACKWARD_TRANSIENT was read from
MEASURED = [(96, 2, 16, 2, 12), (160, 2, 8, 2, 24), (256, 2, 48, 1, 40)]


@pytest.mark.parametrize("width,layers,rank,pairs,answer", MEASURED)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_within_20_percent_of_the_profiler(one_thread, width, layers, rank, pairs, answer,
                                                               checkpointing):
    """bench/dpo_step.py's CPU profiler measures a whole step's peak above the weights: the reference pass, then
    the policy's forward and backward with the LoRA gradients, then AdamW (whose states exist after a first step)."""
    args, model = small_model(width, layers, rank, checkpointing)
    args.pairs = pairs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    shapes = plan_costs.shapes_of(model, vlm.spec(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = dpo_step.make_batch(args, answer, torch.device("cpu"))
    prompt = args.prompt_tokens + shapes.image_tokens
    for forward in ("concatenated", "shared_image", "shared_prefix", "packed"):
        step = lambda: dpo_step.dpo_step(model, optimizer, batch, forward, None)
        step()
        measured = measure.peak_memory(step, torch.device("cpu"))
        rejected = answer if pairs > 1 else answer * 3 // 4  # make_batch: 3/4 of the chosen in every other pair
        geometry = plan_costs.geometry(forward, pairs, prompt, answer, rejected)
        estimate = max(plan_costs.activation_bytes(shapes, geometry, False, checkpointing) + 4 * trainable,
                       plan_costs.reference_bytes(shapes, geometry, False))
        assert 0.8 < estimate / measured < 1.2, (forward, estimate / measured)


def test_flops_equal_torch_flop_counter(one_thread):
    """One DPO step (reference, policy forward and backward) counted by FlopCounterMode, eager attention."""
    args, model = small_model(128, 2, 16, False, attention="eager")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    shapes = plan_costs.shapes_of(model, vlm.spec(model))
    prompt = args.prompt_tokens + shapes.image_tokens
    batch = dpo_step.make_batch(args, 16, torch.device("cpu"))
    for forward in ("concatenated", "shared_prefix"):
        counted = dpo_step.counted_flops(model, optimizer, batch, forward, None)
        ours = plan_costs.step_flops(shapes, plan_costs.geometry(forward, args.pairs, prompt, 16, 16))
        assert abs(ours / counted - 1) < 0.005, (forward, ours / counted)


def test_pair_lengths_from_the_pairs_file(toy_world, toy_pairs, one_thread):
    """--pairs: the lengths the plan reads equal those vlm.encode gives the examples train_ddp.py trains on."""
    import common
    import dpo
    model_dir = os.path.join(toy_world, "model-sft")
    args = train_ddp.parse_args(["--plan", "--model", model_dir, "--pairs", toy_pairs])
    model = plan.meta_model(model_dir, args.lora_r, args.lora_alpha)
    longest, mean, source, count = plan.pair_lengths(args, model, plan_costs.shapes_of(model, vlm.spec(model)))
    _, processor = vlm.load(model_dir)
    template = vlm.resolve_template(model, None)
    rows = []
    for record in common.read_records(toy_pairs):
        image = vlm.load_image(os.path.join(toy_world, "images", record["image"]))
        chosen, rejected = (vlm.encode(processor, image, [(record["question"], answer)], template)
                            for answer in (record["chosen"], record["rejected"]))
        prompt = int(dpo.prompt_length(chosen["labels"]))
        rows.append((prompt, len(chosen["input_ids"]) - prompt, len(rejected["input_ids"]) - prompt))
    assert count == len(rows) and source.startswith(f"{len(rows)} pairs")
    assert longest == tuple(max(r[k] for r in rows) for k in range(3))


def test_paper_scale_tiny(one_thread, capsys):
    """bench/paper_scale.py --tiny: the table, the plan's peak within 20% of the measured one, the same answers."""
    import paper_scale
    rows = paper_scale.main(["--tiny"])
    ratio = float(rows["peak memory, --plan"].split("(")[1].split(" x")[0])
    assert 0.8 < ratio < 1.2 and rows["same answers"] == "4 / 4"
    assert "| s / step (median) |" in capsys.readouterr().out


def test_generation_flops_equal_torch_flop_counter(one_thread, tmp_path):
    """seva.py's cost of one instance: a prefill and a greedy answer (counted twice: the image and its noised
    view), against FlopCounterMode over transformers' generate, eager attention."""
    from torch.utils.flop_counter import FlopCounterMode

    import paper_scale
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = AutoConfig.from_pretrained(paper_scale.model_folder(True, str(tmp_path)))
    config._attn_implementation = "eager"
    model = AutoModelForImageTextToText.from_config(config).eval()
    shapes = plan_costs.shapes_of(model, vlm.spec(model))
    prompt, answer = config.image_seq_length + 20, 6
    ids = torch.randint(1, config.image_token_index, (1, prompt))
    ids[0, 4:4 + config.image_seq_length] = config.image_token_index
    pixels = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, do_sample=False,
                       max_new_tokens=answer, min_new_tokens=answer)
    assert plan_costs.generation_flops(shapes, prompt, answer) == pytest.approx(2 * counter.get_total_flops(), rel=0.005)
