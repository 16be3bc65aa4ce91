"""Porting: SeVa's code paths on tiny random models of ten Hugging Face VLM families (tests/families.py),
each loaded from a local folder by vlm.load, with nothing family-specific outside vlm.FAMILIES."""
import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families  # noqa: E402  (importing it lets Qwen2-VL's processor load without torchvision)

import collate  # noqa: E402
import diffusion  # noqa: E402
import draft  # noqa: E402
import dpo  # noqa: E402
import eval.runner  # noqa: E402
import lora  # noqa: E402
import positions  # noqa: E402
import seva  # noqa: E402
import train_ddp  # noqa: E402
import trainable  # noqa: E402
import vlm  # noqa: E402
from generate import generate, generate_tokens, score_answers  # noqa: E402

QUESTIONS = ["What colour is the square?", "How many objects are there in the image?", "Is there a red circle?",
             "What shape is it?", "What word is written on the image?"]
SIZES = [(32, 32), (64, 32), (32, 96), (48, 48), (64, 64)]  # any-resolution families: different crops and patches


def images():
    return [families.image(i).resize(size) for i, size in enumerate(SIZES)]


def sharpen(model, seed=0):
    """Random weights large enough that a tiny model's answers depend on the image and the question (at the
    builders' small initialisation every answer is the same, and equal answers would prove little)."""
    torch.manual_seed(seed)
    std = 0.05 if model.config.model_type == "gemma3" else 0.3  # Gemma scales its embeddings by sqrt(width)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: families.build(name, str(root / name)) for name in families.FAMILY_NAMES}


@pytest.fixture(params=families.FAMILY_NAMES)
def family(request, folders):
    model, processor = vlm.load(folders[request.param])
    return request.param, model.eval(), processor


def test_batched_generation_equals_batch_1_clean_and_noisy(family):
    _, model, processor = family
    sharpen(model)
    ids = [f"q{i}" for i in range(len(QUESTIONS))]
    noise = lambda pixels, rows: diffusion.diffusion_noise_rows(pixels, [ids[i] for i in rows], 600, 0)
    answers = {}
    for name, transform in (("clean", None), ("noisy", noise)):
        one = generate_tokens(model, processor, images(), QUESTIONS, max_new_tokens=5, batch_size=1,
                              pixel_transform=transform)
        batched = generate_tokens(model, processor, images(), QUESTIONS, max_new_tokens=5, batch_size=3,
                                  pixel_transform=transform)
        assert one == batched
        answers[name] = one[1]
    assert len(set(map(tuple, answers["clean"]))) > 1  # the answers depend on the inputs...
    assert answers["noisy"] != answers["clean"]  # ...and the noise reaches the model


def test_prompts_read_a_few_at_a_time_give_the_same_answers(family):
    """generate(prefill_batch=k): the prompts' KV cache made k rows at a time, then one batched decoding; the
    answers, their ids and their log-probs equal batch 1's (and a family it cannot serve says so)."""
    name, model, processor = family
    sharpen(model)
    if not vlm.spec(model.config)["prefill_rows"]:
        with pytest.raises(ValueError, match="whole batch"):
            generate(model, processor, images(), QUESTIONS, max_new_tokens=5, batch_size=5, prefill_batch=2)
        return
    one = generate_tokens(model, processor, images(), QUESTIONS, max_new_tokens=5, batch_size=1)
    assert generate_tokens(model, processor, images(), QUESTIONS, max_new_tokens=5, batch_size=5,
                           prefill_batch=2) == one
    _, _, whole = generate_tokens(model, processor, images(), QUESTIONS, max_new_tokens=5, batch_size=5,
                                  keep_state=True)
    _, ids, state = generate_tokens(model, processor, images(), QUESTIONS, max_new_tokens=5, batch_size=5,
                                    keep_state=True, prefill_batch=2)
    assert ids == one[1]
    logps = lambda s: torch.stack(s["logits"], 1).float().log_softmax(-1)  # (B, new, V)
    assert torch.allclose(logps(state), logps(whole), atol=1e-5)
    assert state["cache"].get_seq_length() == whole["cache"].get_seq_length() == state["input_ids"].shape[1]


def test_reference_scores_from_the_generation_equal_the_naive_forward(family):
    """seva.py --reference-logps: answers scored on the prompts' KV cache (the greedy one from its own generation,
    others teacher-forced at the positions after the prompt, positions.next_positions) equal training's naive
    forward on the same pairs (Gemma 3's sliding window of 8 tokens included: its prompts are ~30)."""
    name, model, processor = family
    sharpen(model)
    answers, ids, state = generate_tokens(model, processor, images()[:3], QUESTIONS[:3], max_new_tokens=4,
                                         batch_size=3, keep_state=True)
    others = ["a red circle", "two", "no"]
    scored = score_answers(model, processor, state, images()[:3], QUESTIONS[:3],
                           [[a, o] for a, o in zip(answers, others)], ids)
    encoded = [collate.encode_pair(processor, image, q, a, o, vlm.resolve_template(model))
               for image, q, a, o in zip(images(), QUESTIONS, answers, others)]
    with torch.no_grad():
        chosen, rejected = dpo.concatenated_forward(model, collate.collate_pairs(encoded, processor.tokenizer.pad_token_id))
    assert [v for pair in scored for v in pair] == pytest.approx(
        [v for pair in zip(chosen.tolist(), rejected.tolist()) for v in pair], abs=1e-4)


def test_prompt_mask_covers_exactly_the_answer(family):
    name, model, processor = family
    template, image, question = vlm.resolve_template(model), families.image(0), QUESTIONS[1]
    example = vlm.encode(processor, image, [(question, "two red squares")], template)
    # the unlabelled part is the generation prompt, token for token as generate.py sends it
    prompt = processor(images=[image], text=[vlm.prompt_text(processor, question, template)], return_tensors="pt")
    n = prompt["input_ids"].shape[1]
    assert torch.equal(example["input_ids"][:n], prompt["input_ids"][0])
    labelled = example["labels"] != -100
    assert not labelled[:n].any() and labelled[n:].all() and len(example["input_ids"]) > n
    # the labelled tokens are the answer and its end-of-turn token, nothing else
    answer = example["input_ids"][n:]
    assert torch.equal(example["labels"][n:], answer)
    assert answer[-1] == processor.tokenizer.eos_token_id
    assert processor.tokenizer.decode(answer, skip_special_tokens=True).strip() == "two red squares"
    for key in vlm.TOKEN_KEYS:  # per-token tensors: the processor's on the prompt, then the suffix's value
        assert (key in example) == (key in prompt)
        if key in example:
            after = vlm.after_prompt(processor, key)
            assert torch.equal(example[key][:n], prompt[key][0]) and (example[key][n:] == after).all()
    assert ("token_type_ids" in example) == (name in ("paligemma", "gemma3"))  # their masks need them
    assert vlm.after_prompt(processor, "token_type_ids") == (1 if name == "paligemma" else 0)  # 1: PaliGemma's suffix


def test_lora_targets_land_on_every_language_model_linear_and_nowhere_else(family):
    _, model, _ = family
    row = vlm.spec(model)
    layers = model.get_submodule(row["decoder_layers"])
    linears = sum(isinstance(m, torch.nn.Linear) for m in layers.modules())
    lora.apply_lora(model, 4, 8)
    vlm.freeze_vision(model)
    names = [n for n, _ in lora.lora_modules(model)]
    assert len(names) == linears > 0  # every linear of the decoder layers (attention and MLP), counted by type
    assert all(n.startswith(row["decoder_layers"] + ".") for n in names)
    for path in (row["vision_tower"], row["projector"]):
        assert not any(isinstance(m, lora.LoRALinear) for m in model.get_submodule(path).modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def pair_batch(model, processor, pairs=3):
    """Different images (sizes too), questions and answers per pair."""
    template = vlm.resolve_template(model)
    answers = [("red", "a big blue square"), ("two", "three circles"), ("yes", "no")]
    encoded = [collate.encode_pair(processor, image, question, chosen, rejected, template)
               for image, question, (chosen, rejected) in zip(images()[:pairs], QUESTIONS, answers)]
    return collate.collate_pairs(encoded, processor.tokenizer.pad_token_id)


def test_every_pair_forward_of_the_family_equals_the_naive_one(family):
    _, model, processor = family
    sharpen(model)
    lora.apply_lora(model, 4, 8)
    for module in lora.lora_modules(model):  # B != 0, so that LoRA counts in the comparison
        torch.nn.init.normal_(module[1].lora_B.weight, std=0.02)
    batch = pair_batch(model, processor)
    with torch.no_grad():
        naive = dpo.concatenated_forward(model, batch)
        assert len(set(naive[0].tolist())) == 3  # three different pairs: a mix-up between them would show
        for name in vlm.spec(model)["pair_forwards"]:
            for got, want in zip(dpo.PAIR_FORWARDS[name](model, batch), naive):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_dpo_step_lowers_the_loss_on_a_repeated_pair(family, capsys):
    _, model, processor = family
    lora.apply_lora(model, 8, 16)
    vlm.freeze_vision(model)
    pair = collate.encode_pair(processor, families.image(3), QUESTIONS[0], "red", "a big blue square",
                               vlm.resolve_template(model))
    batch = collate.collate_pairs([pair] * 2, processor.tokenizer.pad_token_id)
    forward = trainable.pair_forward_for(model, "shared_prefix")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = train_ddp.dpo_micro_step(model, model, None, batch, forward, beta=0.1)
    assert loss.item() == pytest.approx(2 * math.log(2), abs=1e-5)  # LoRA B = 0: the policy is the reference
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = train_ddp.dpo_micro_step(model, model, None, batch, forward, beta=0.1)
    assert after.item() < loss.item()
    fell_back = "falling back to the concatenated forward" in capsys.readouterr().out
    assert fell_back == ("shared_prefix" not in vlm.spec(model)["pair_forwards"])  # said, where it happens


def same_image(alone, in_batch):
    """An image's pixels processed alone equal its pixels in a batch, where crops of zeros may pad it."""
    return torch.equal(in_batch[:len(alone)], alone) and not in_batch[len(alone):].any()


def test_diffusion_noise_lands_on_each_image_of_the_family_layout(family):
    name, model, processor = family
    config, prompt = model.config, vlm.prompt_text(processor, QUESTIONS[0], vlm.resolve_template(model))
    small, large = images()[0], images()[2]  # different sizes: the large one may have more crops or patches
    both = processor(images=[[small], [large]], text=[prompt] * 2, padding=True, return_tensors="pt")
    alone = processor(images=[large], text=[prompt], return_tensors="pt")
    pixels = vlm.image_pixels(both, config)
    assert len(pixels) == 2 and same_image(vlm.image_pixels(alone, config)[0], pixels[1])  # image 1's own
    assert torch.equal(vlm.with_image_pixels(both, config, pixels)["pixel_values"], both["pixel_values"])
    noisy = vlm.with_image_pixels(both, config, diffusion.diffusion_noise_rows(pixels, ["a", "b"], 500, 0))
    noisy_alone = vlm.with_image_pixels(alone, config, diffusion.diffusion_noise_rows(
        vlm.image_pixels(alone, config), ["b"], 500, 0))
    assert noisy["pixel_values"].shape == both["pixel_values"].shape
    assert same_image(vlm.image_pixels(noisy_alone, config)[0], vlm.image_pixels(noisy, config)[1])  # batch-free
    # q(x_t | x_0): what was added is sqrt(1 - abar) times a standard normal draw
    abar = diffusion.alpha_bar()[500].item()
    for clean, dirty in zip(pixels, vlm.image_pixels(noisy, config)):
        real = ~(clean == 0).flatten(1).all(-1) if clean.dim() == 4 else slice(None)  # padding crops aside
        eps = (dirty[real] - math.sqrt(abar) * clean[real]) / math.sqrt(1 - abar)
        assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1) < 0.1
    if vlm.spec(config)["pixels"] == "patches":  # Qwen2-VL: one image is T identical frames, noised alike
        vision = config.vision_config
        frames = noisy["pixel_values"].view(len(noisy["pixel_values"]), vision.in_channels,
                                            vision.temporal_patch_size, -1)
        assert all(torch.equal(frames[:, :, 0], frames[:, :, t]) for t in range(1, frames.shape[2]))
    elif both["pixel_values"].dim() == 5:  # crops: those padding a smaller image stay zeros (Idefics3 needs it)
        padding = (both["pixel_values"] == 0).flatten(2).all(-1)
        assert torch.equal((noisy["pixel_values"] == 0).flatten(2).all(-1), padding)


def test_seva_train_ddp_and_eval_run_on_the_family(family, folders, tmp_path):
    """Alg. 1 and the evaluation through the scripts' own entry points, the family's defaults from its folder."""
    name, _, _ = family
    os.makedirs(tmp_path / "images")
    records, pairs = [], []
    for i, question in enumerate(QUESTIONS * 2):
        families.image(i).save(tmp_path / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": "red"}]})
        pairs.append({"id": f"{i}-0", "image": f"{i}.png", "question": question, "chosen": "red",
                      "rejected": "blue" if i % 2 else "two squares"})
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    summary = seva.main(["--model", folders[name], "--data", str(tmp_path / "data.json"), "--image-folder",
                         str(tmp_path / "images"), "--num-samples", "10", "--batch-size", "4", "--noise-step", "800",
                         "--max-new-tokens", "4", "--out", str(tmp_path / "seva.jsonl"), "--no-progress"])
    assert summary["answered"] == 10
    model = train_ddp.train(train_ddp.parse_args([
        "--model", folders[name], "--pairs", str(tmp_path / "pairs.jsonl"), "--image-folder", str(tmp_path / "images"),
        "--out", str(tmp_path / "dpo"), "--batch-size", "4", "--max-steps", "2", "--lora-r", "4", "--lora-alpha", "8",
        "--merge", "--no-progress"]))
    assert json.load(open(tmp_path / "dpo" / "args.json"))["template"] == vlm.spec(model)["template"]
    merged, processor = vlm.load(str(tmp_path / "dpo" / "merged"))
    assert merged.config.model_type == name
    questions = [{"question_id": i, "image": f"{i}.png", "text": q} for i, q in enumerate(QUESTIONS)]
    for settings in (dict(noise_step=500), dict(temperature=1.0)):  # eval/: noisy greedy, and sampling
        out = str(tmp_path / f"{next(iter(settings))}.jsonl")
        rows = eval.runner.answer_questions(merged, processor, questions, out, "merged", str(tmp_path / "images"),
                                            max_new_tokens=3, batch_size=2, weights="merged", **settings)
        assert [r["question_id"] for r in rows] == list(range(len(QUESTIONS)))


def test_chat_turns_that_do_not_end_in_eos_keep_the_template_text():
    """A multi-turn conversation whose template ends turns with a newline, not eos: each answer is trained with
    an eos, and the text between the pieces is the template's, whitespace included."""
    from jinja2 import Template
    template = Template("{% for m in messages %}{{ m.role }}: {{ m.content[-1].text }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    processor = SimpleNamespace(tokenizer=SimpleNamespace(eos_token="<eos>"), apply_chat_template=lambda messages,
                                add_generation_prompt=False, tokenize=False: template.render(
                                    messages=messages, add_generation_prompt=add_generation_prompt))
    pieces = vlm.render_turns(processor, [("q1", "a1"), ("q2", "a2")], "chat")
    assert pieces == [("user: q1\nassistant:", False), (" a1<eos>", True), ("\nuser: q2\nassistant:", False),
                      (" a2<eos>", True)]


@pytest.mark.parametrize("negatives", [[], ["--negative-steps", "20,100,400"]], ids=["one", "three"])
def test_drafted_rejected_answers_leave_the_pairs_file_unchanged(family, tmp_path, negatives, monkeypatch):
    """seva.py's rejected answers drafted by the chosen ones (the default, draft.py) or decoded one token per forward
    (--no-draft): the same pairs file byte for byte, with one negative and with three. The families that cannot
    draft (draft.can_draft: 1D positions, a causal mask) decode plainly either way."""
    _, model, processor = family
    folder = str(tmp_path / "model")
    sharpen(model).save_pretrained(folder)
    processor.save_pretrained(folder)
    os.makedirs(tmp_path / "images")
    records = []
    for i, question in enumerate(QUESTIONS * 2):
        families.image(i).resize(SIZES[i % len(SIZES)]).save(tmp_path / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": "red"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    drafted_batches = []
    decode = draft.decode
    monkeypatch.setattr(draft, "decode", lambda *a, **k: drafted_batches.append(1) or decode(*a, **k))
    files = {}
    for setting in ([], ["--no-draft"]):
        out = str(tmp_path / f"pairs{len(setting)}.jsonl")
        summary = seva.main(["--model", folder, "--data", str(tmp_path / "data.json"), "--image-folder",
                             str(tmp_path / "images"), "--batch-size", "4", "--noise-step", "100", "--max-new-tokens", "6", "--precision",
                             "fp32", "--out", out, "--no-progress", *negatives, *setting])
        files[len(setting)] = open(out, "rb").read()
    assert files[0] == files[1]
    assert negatives or 0 < summary["pairs"] < summary["answered"]  # some rejected answers equal their draft, some not
    assert bool(drafted_batches) == draft.can_draft(model)  # drafted where the family allows
