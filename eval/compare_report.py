"""
eval.compare's report: the table like paper Table 2 (rows the models, columns the benchmarks, a delta row) and
its sections (POPE every metric, short answers by family, open-ended answers, the pairs trained, pair-wise
outcomes, consistency under sampling) as OUT/compare.md, and the bar chart OUT/compare.png.
"""
import common
from eval import hallucination, pope

MODELS = ("SFT", "SeVa")
YES_RATIO_BAND = (0.2, 0.8)  # outside it, a POPE model answers nearly always yes (or no): its F1 says nothing


def table_columns(results):
    """{column: value in percent} of one model, in the paper's order where it has the benchmark."""
    columns = {}
    if results.get("mmvet"):
        columns["MMVet"] = results["mmvet"]["score"]
    if results.get("llava-bench"):
        columns["LLaVA-W"] = results["llava-bench"]["all"]["relative"]
    for key, value in results.items():
        if key.startswith("mc/") and value:
            columns[key[3:]] = 100 * value["accuracy"]
    if results.get("gqa") and results["gqa"]["accuracy"] is not None:
        columns["GQA"] = 100 * results["gqa"]["accuracy"]
    if results.get("shr"):
        columns["SHR"] = 100 * results["shr"]["shr"]  # lower is better
    if "pope" in results:  # F1, as LLaVA-1.5 and SeVa report POPE
        short = {"random": "rand", "popular": "pop", "adversarial": "adv"}
        for split, metrics in results["pope"].items():
            if split != "average":
                columns[f"POPE-{short.get(split, split)}"] = 100 * metrics["f1"]
        columns["POPE"] = 100 * results["pope"]["average"]["f1"]
    if "toyvqa" in results:
        columns["VQA"] = 100 * results["toyvqa"]["clean"]["overall"]
        if "noisy" in results["toyvqa"]:
            columns["VQA-noisy"] = 100 * results["toyvqa"]["noisy"]["overall"]
    if results.get("open"):
        for kind, short in (("caption", "cap"), ("description", "desc")):
            for metric, name in (("chair_i", "CHAIR_i"), ("chair_s", "CHAIR_s"), ("cover", "Cover"), ("shr", "SHR")):
                columns[f"{name}-{short}"] = 100 * results["open"][kind][metric]
        columns["Sentences"] = 100 * results["open"]["sentence"]["overall"]
    return columns


def degenerate_pope(metrics):
    """A POPE split whose yes-ratio leaves YES_RATIO_BAND: the model answers (nearly) always one way."""
    return not YES_RATIO_BAND[0] <= metrics["yes_ratio"] <= YES_RATIO_BAND[1]


def degenerate_columns(results):
    """The POPE columns of one model whose yes-ratio leaves YES_RATIO_BAND (the average: if any split does)."""
    short = {"random": "rand", "popular": "pop", "adversarial": "adv"}
    bad = {f"POPE-{short.get(split, split)}" for split, metrics in results.get("pope", {}).items()
           if split != "average" and degenerate_pope(metrics)}
    return bad | ({"POPE"} if bad else set())


def judged_notes(results):
    """The judged columns whose scores are not comparable with published ones, and why (eval/judge_client.py)."""
    notes = []
    for key, column in (("mmvet", "MMVet"), ("llava-bench", "LLaVA-W"), ("shr", "SHR")):
        for name in MODELS:
            if results[name].get(key) and not results[name][key]["comparable"]:
                notes.append(f"{column} ({name}): {results[name][key]['note']}")
    return notes


def table_rows(table, degenerate):
    """The main table's rows: each model, then the delta; a POPE cell of a degenerate model (and its delta) marked."""
    rows = []
    for name in MODELS + ("delta",):
        cells = []
        for column, value in zip(table["columns"], table[name]):
            marked = column in degenerate["SFT"] | degenerate["SeVa"] if name == "delta" else column in degenerate[name]
            cells.append((f"{value:+.1f}" if name == "delta" else f"{value:.1f}") + (" (degenerate)" if marked else ""))
        rows.append([name if name != "delta" else "delta (SeVa - SFT)"] + cells)
    return rows


def pope_prompt(suffix):
    """Which POPE prompt was asked, in words: the same model answers the two differently (python -m toyworld's
    bands ask with LLaVA's one-word suffix; eval.compare asks the question alone unless --prompt-suffix llava)."""
    if not suffix:
        return "the question alone"
    return "the question + LLaVA-1.5's one-word suffix" if suffix == pope.LLAVA_SUFFIX else f"the question + {suffix!r}"


def pope_section(results, suffix=""):
    """Every POPE metric of both models, split by split, with the yes-ratio that F1 hides; `suffix`: the prompt's."""
    rows = []
    for name in MODELS:
        for split, m in results[name].get("pope", {}).items():
            if split == "average":
                continue
            rows.append([name, split] + [f"{100 * m[k]:.1f}" for k in ("accuracy", "f1", "precision", "recall")]
                        + [f"{m['yes_ratio']:.2f}", "**degenerate**" if degenerate_pope(m) else ""])
    if not rows:
        return []
    return ["", f"## POPE, every metric (prompt: {pope_prompt(suffix)})", ""] + common.markdown_table(
        ["model", "split", "accuracy", "F1", "precision", "recall", "yes-ratio", ""], rows) + [
        "", f"Degenerate: the yes-ratio leaves {YES_RATIO_BAND[0]}-{YES_RATIO_BAND[1]}; such a model answers "
            "(nearly) always one way, and a change of its F1 is no change of what it sees."]


def short_answer_section(results):
    """Toy VQA exact match by question family, both models and the delta (clean images)."""
    if not all("toyvqa" in results[name] for name in MODELS):
        return []
    scores = {name: results[name]["toyvqa"]["clean"] for name in MODELS}
    families = list(scores["SFT"])
    rows = [[name] + [f"{100 * scores[name][f]:.1f}" for f in families] for name in MODELS]
    rows.append(["delta"] + [f"{100 * (scores['SeVa'][f] - scores['SFT'][f]):+.1f}" for f in families])
    return ["", "## Short answers by family (toy VQA, exact match)", ""] + common.markdown_table(["model", *families],
                                                                                                  rows)


def open_section(results):
    """Captions and descriptions: every hallucination metric and the answer length, both models and the delta."""
    if not all(results[name].get("open") for name in MODELS):
        return []
    metrics = (("chair_i", "CHAIR_i", 100), ("chair_s", "CHAIR_s", 100), ("cover", "Cover", 100),
               ("shr", "SHR-like", 100), ("words", "words", 1), ("sentences", "sentences", 1),
               ("unparsed", "unparsed", 1))
    rows = []
    for kind in hallucination.KINDS:
        for name in MODELS:
            m = results[name]["open"][kind]
            rows.append([kind, name] + [f"{scale * m[k]:.1f}" if scale == 100 or k != "unparsed" else str(m[k])
                                        for k, _, scale in metrics])
        a, b = results["SFT"]["open"][kind], results["SeVa"]["open"][kind]
        rows.append([kind, "delta"] + [f"{scale * (b[k] - a[k]):+.1f}" for k, _, scale in metrics])
    sentence = {name: results[name]["open"]["sentence"] for name in MODELS}
    return ["", "## Open-ended answers (toy world, scored against the scene graphs)", ""] + common.markdown_table(
        ["answers", "model", *[label for _, label, _ in metrics]], rows) + [
        "", "Percent but words, sentences (per answer) and unparsed (sentences outside the grammar, counted as false "
            "in SHR-like). CHAIR and SHR-like: lower is better; Cover: higher is better; words: the length change "
            "(paper Fig. 5).",
        "", "Sentence answers right: " + "; ".join(
            f"{name} " + ", ".join(f"{f} {100 * v:.1f}" for f, v in sentence[name].items()) for name in MODELS)]


def pairs_section(pair_table, quality):
    """The pairs trained: which side holds more false claims (open-ended answers, per subset) and, where the json
    had the answer, whether chosen is right and rejected wrong (seva.py's pair quality)."""
    lines = []
    if pair_table:
        rows = [[subset, r["pairs"]] + [f"{100 * r[c] / r['pairs']:.1f}" for c in hallucination.PAIR_CLASSES]
                + [f"{r['false_chosen']:.2f}", f"{r['false_rejected']:.2f}", f"{r['words_chosen']:.1f}",
                   f"{r['words_rejected']:.1f}"] for subset, r in pair_table.items()]
        lines += ["", "## The pairs trained: which side holds more false claims", ""] + common.markdown_table(
            ["subset", "pairs", *[f"{c} %" for c in hallucination.PAIR_CLASSES], "false claims chosen",
             "false claims rejected", "words chosen", "words rejected"], rows) + [
            "", "False claims: claims the image's scene graph contradicts, and sentences outside the grammar."]
    if quality:
        total = sum(quality.values())
        lines += ["", f"Pairs with the json's answer ({total}): " + ", ".join(
            f"{name} {100 * count / total:.1f}%" for name, count in quality.items())]
    return lines


LOWER_IS_BETTER = ("CHAIR", "SHR")  # column prefixes: hallucination rates


def caption(columns, noise_step):
    """The table's caption: a note for each kind of column the table has, and no other."""
    has = lambda *prefixes: any(c.startswith(prefixes) for c in columns)
    notes = [(has("POPE"), "POPE columns: F1 (POPE = the average over the splits, as in the paper)."),
             (has("VQA"), "VQA: toy-world exact match" + ("; VQA-noisy: the same under diffusion noise at step "
                                                          f"{noise_step}." if has("VQA-noisy") else ".")),
             (has("CHAIR", "Cover"), "CHAIR_i, CHAIR_s, Cover, SHR (SHR-like on the toy world) of captions (cap) "
                                     "and descriptions (desc)."),
             (has("Sentences"), "Sentences: sentence answers right."),
             (has("MMVet"), "MMVet: judge score."), (has("LLaVA-W"), "LLaVA-W: relative score to the reference answers."),
             (has(*LOWER_IS_BETTER), "CHAIR and SHR: lower is better; every other column: higher is better.")]
    return " ".join(["Percent."] + [text for present, text in notes if present])


def markdown(table, pairwise, consistency_by_model, model_ids, args, notes=(), results=None, pair_table=None,
             quality=None):
    results = results or {name: {} for name in MODELS}
    degenerate = {name: degenerate_columns(results[name]) for name in MODELS}
    lines = [f"Models: SFT `{model_ids['SFT']}`; SeVa `{model_ids['SeVa']}`.", "",
             "## Benchmarks (paper Table 2)", ""]
    lines += common.markdown_table(["model", *table["columns"]], table_rows(table, degenerate))
    lines += ["", caption(table["columns"], args.noise_step)]
    if degenerate["SFT"] | degenerate["SeVa"]:
        lines += ["", f"**(degenerate): POPE yes-ratio outside {YES_RATIO_BAND[0]}-{YES_RATIO_BAND[1]}; the F1 and "
                      "its delta say nothing.**"]
    lines += [f"**{note}**" for note in notes]
    lines += pope_section(results, args.prompt_suffix) + short_answer_section(results) + open_section(results)
    lines += pairs_section(pair_table, quality)
    if pairwise:
        lines += ["", "## Pair-wise, SeVa against SFT (paper Fig. 5)", ""] + common.markdown_table(
            ["benchmark", "win", "lose", "tie"], [[name, c["win"], c["lose"], c["tie"]] for name, c in pairwise.items()])
        lines += ["", "Win: SeVa's answer right and SFT's wrong (with a judge: scored higher); lose: the reverse."]
    if any(consistency_by_model.values()):
        temperatures = list(next(v for v in consistency_by_model.values() if v))
        header = ["temperature"] + [f"{m} {what}" for m in MODELS for what in ("agreement", "accuracy")]
        rows = [[t] + [f"{100 * consistency_by_model[m][t][what]:.1f}" for m in MODELS for what in ("agreement", "accuracy")]
                for t in temperatures]
        lines += ["", "## Consistency under sampling (paper Table 5's idea)", ""] + common.markdown_table(header, rows)
        lines += ["", "Agreement: the share of sampled answers (seeded) equal to the model's greedy answer."]
    return "\n".join(lines) + "\n"


def bar_chart(table, consistency_by_model, path, degenerate=None):
    """Grouped bars per benchmark (and the consistency curves, if measured) into a PNG; degenerate ({model:
    columns}, degenerate_columns): those bars hatched and their labels marked, as the table marks them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    has_curves = any(consistency_by_model.values())
    fig, axes = plt.subplots(1, 2 if has_curves else 1, figsize=(12 if has_curves else 8, 4), squeeze=False)
    ax = axes[0][0]
    columns, width = table["columns"], 0.38
    for k, name in enumerate(MODELS):
        positions = [i + (k - 0.5) * width for i in range(len(columns))]
        bars = ax.bar(positions, table[name], width, label=name)
        marked = (degenerate or {}).get(name, set())
        for bar, column in zip(bars, columns):
            if column in marked:
                bar.set_hatch("//")
        # vertical labels: two bars' numbers side by side never run into each other
        ax.bar_label(bars, labels=[f"{v:.1f}" + ("*" if c in marked else "") for v, c in zip(table[name], columns)],
                     fontsize=7, rotation=90, padding=2)
    ticks = [c + (" (lower is better)" if c.startswith(LOWER_IS_BETTER) else "") for c in columns]
    ax.set_xticks(range(len(columns)), ticks, rotation=30, ha="right")
    ax.set_ylabel("percent")
    ax.set_ylim(0, 125)  # room for the vertical labels above a bar of 100
    ax.set_title("SFT vs SeVa (paper Table 2)" + ("; hatched*: degenerate (POPE yes-ratio outside "
                                                   f"{YES_RATIO_BAND[0]}-{YES_RATIO_BAND[1]})"
                                                   if any((degenerate or {}).values()) else ""), fontsize=9)
    from matplotlib.patches import Patch  # plain swatches: a hatched first bar would hatch its legend entry
    ax.legend(handles=[Patch(facecolor=f"C{k}", label=name) for k, name in enumerate(MODELS)])
    if has_curves:
        ax = axes[0][1]
        for name in MODELS:
            points = consistency_by_model[name]
            ax.plot([float(t) for t in points], [100 * p["agreement"] for p in points.values()], marker="o", label=name)
        ax.set_ylim(0, 105)
        ax.set_xlabel("sampling temperature")
        ax.set_ylabel("agreement with the greedy answer (%)")
        ax.set_title("Consistency (paper Table 5's idea)")
        ax.legend()
    fig.tight_layout()
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
