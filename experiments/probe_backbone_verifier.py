"""Probe (issue 3): can the policy's backbone LEARN to verify its own countdown rollouts?

A head on the frozen tiny policy's features has no signal on countdown (README, "Head-only SPRM
training"): what decides a rollout there is whether its last step writes the target with true
arithmetic (`experiments.countdown_failures`), and next-token prediction never needed the policy
to compute that. This probe lets the backbone learn it (`experiments.backbone_tuning`: the SPRM
head and the backbone trained together on cached rollouts; SPR loss on outcome labels,
class-balanced batches, the head's gradient into the backbone scaled by --grad-scale; extra
positives from the task's reference solutions, --reference-solutions K per train problem; anchors:
--kl-coef to the frozen policy, --lm-coef a next-token loss on the correct examples). Then the
held-out rollouts are read again with the tuned backbone and the head ranks them: within-problem
AUC, held-out fc/diff_prob and Best-of-n against confidence, majority and the oracle.

It measures (the demo's SPRM stage is `experiments.demo_reflective`). The tuned backbone samples other rollouts than
the cached ones: `--own-problems K` lets it sample its own rollouts of K test problems and rank
them with its head (is it still a policy, and does its head still pick the right answers);
`--save DIR` keeps the tuned reflective model. Settings and inputs are checked before anything is
trained (the caches must be countdown rollouts of --policy); a bad one prints "error: <message>"
on stderr and exits with code 2. Ctrl-C (or SIGTERM) prints one line and exits 130 (143): while
it imports and checks its arguments "interrupted while starting: nothing was written", then what
is kept (`interrupt_hint`): nothing until the tuned model is saved in --save (after training);
--out is written last, atomically (an earlier file there is kept until then).

    python -m experiments.rollout_cache --policy outputs/checkpoints/tiny-countdown/final --task countdown \\
        --split train --problems 4096 --n 8 --out /tmp/cd/train.pt            # ~7 min, 32768 rollouts
    python -m experiments.rollout_cache ... --split test --problems 200 --n 32 --out /tmp/cd/test.pt
    python -m experiments.probe_backbone_verifier --train /tmp/cd/train.pt --test /tmp/cd/test.pt \\
        --steps 900 --backbone-lr 1e-3 --reference-solutions 2 --out /tmp/cd/probe.json   # ~15 min, 2 cores
    ... --kl-coef 0.1 --own-problems 200 --save /tmp/cd/tuned

Tests: `.venv/bin/pytest tests/test_probe_backbone_verifier.py tests/test_cli_interrupts.py`.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/train_sft.py: shared cores

from experiments.startup_interrupt import quiet_start  # noqa: E402

quiet_start(__name__)  # Ctrl-C during the imports below: one line, not their traceback

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from experiments.cli_args import check_file_target, check_folder_target, nonnegative_int, positive_int, seed_int  # noqa: E402
from experiments.cli_errors import interrupt_reported, run_command  # noqa: E402
from experiments.backbone_tuning import (BackboneTuneConfig, check_examples, paths_of, rollout_examples,  # noqa: E402
                                         solution_examples, train)
from experiments.countdown_failures import cache_problems  # noqa: E402
from experiments.result_json import write_atomic  # noqa: E402
from experiments.rollout_cache import (FeatureReader, FileId, RolloutCache, build_rollout_cache, file_id,  # noqa: E402
                                       load_cache, read_from)
from experiments.tasks import countdown  # noqa: E402
from experiments.train_head import bon_table, cache_metrics, check_same_source  # noqa: E402
from policies.checkpoint import load_checkpoint  # noqa: E402
from policies.reflective_model import ReflectiveModel  # noqa: E402
from scorers.head_training import position_probs, rollout_min_scores, rollout_path_scores  # noqa: E402
from scorers.spr_loss import SPR_MODES  # noqa: E402
from treesearch.records import Prefix  # noqa: E402


def evaluate(reflective: ReflectiveModel, test: RolloutCache, paths: Sequence[Prefix], reader: FeatureReader
             ) -> tuple[dict[str, float], torch.Tensor]:
    """The model re-reads the held-out rollouts (`paths_of(test, ...)`); its head ranks them.
    Returns the metrics and the head's [P] step scores in the cache's position order."""
    readings = reader.read(paths)
    layer = reflective.feature_layer
    features = torch.cat([r.features[layer] for r in readings])  # [P, C], the cache's position order
    reread = replace(test, features={layer: features})
    probs = position_probs(reflective.head, features)
    metrics = ranking_metrics(reflective, reread, probs, "heldout", head_min_scores=rollout_min_scores(probs, reread))
    return metrics, probs


def ranking_metrics(reflective: ReflectiveModel, cache: RolloutCache, probs: torch.Tensor, prefix: str,
                    **table_options: Any) -> dict[str, float]:
    """`<prefix>_fc/*` of the head on the cache's features and `bon_table` (means) of its [P] step
    scores `probs`; table_options go to bon_table."""
    table = bon_table(cache, rollout_path_scores(probs, cache), **table_options)
    held = cache_metrics(reflective.head, cache, reflective.feature_layer, prefix, False)
    out = {k: v for k, v in held.items() if isinstance(v, float)}
    out.update({k: v.mean for k, v in table.items()})
    return out


def own_samples(folder: Path, problems: int, n: int, progress: bool = True) -> dict[str, float]:
    """The tuned model as a policy: it samples n rollouts of each of the first `problems` test
    problems (`rollout_cache.build_rollout_cache`, the task's default temperature) and its own
    head ranks them (the same scores as in-generation scoring, `policies.reflective_model`):
    pass@1, pass@n, Best-of-n by the head and by confidence, majority, `own_fc/*`."""
    reflective, _ = ReflectiveModel.from_pretrained(folder)
    layer = reflective.feature_layer
    cache = build_rollout_cache(folder, "countdown", "test", problems, n, feature_layers=(layer,), progress=progress)
    return ranking_metrics(reflective, cache, position_probs(reflective.head, cache.layer(layer)), "own", sizes=[n])


def check_caches(policy: Path, train: RolloutCache, test: RolloutCache) -> None:
    """The caches must be countdown rollouts of one policy, the one given (a ValueError naming
    both, as `experiments.train_head` says it; checked before any model is loaded)."""
    check_same_source(train, test)
    if train.task != "countdown":
        raise ValueError(f"the probe reads countdown rollouts; the caches hold task {train.task!r}")
    if train.spec.get("split") != "train":  # its examples would hold the test problems --own-problems samples
        raise ValueError(f"--train holds rollouts of the {train.spec.get('split')!r} split; give the train split's "
                         "cache (python -m experiments.rollout_cache ... --split train)")
    if not read_from(train, policy):
        raise ValueError(f"--policy {policy} and the rollout caches (of {train.spec['policy_dir']}) "
                         "come from different policies (other weights)")


def run(policy: Path, train_cache: Path, test_cache: Path, cfg: BackboneTuneConfig, progress: bool = True,
        save_dir: Path | None = None, own_problems: int = 0) -> dict[str, Any]:
    """Train and measure (module docstring); save_dir: also save the tuned reflective model there
    (transformers folder + score_module.pt); own_problems: also let the tuned model sample its own
    rollouts of that many test problems (n as the held-out cache) and rank them (`own_samples`:
    does it still solve problems, and does its head pick the right ones). Inputs are checked
    before anything is trained: the caches against the policy (`check_caches`) and the examples
    against the batch (`backbone_tuning.check_examples`)."""
    if not isinstance(own_problems, int) or own_problems < 0:
        raise ValueError(f"own_problems={own_problems!r} must be an integer >= 0")
    torch.manual_seed(cfg.seed)
    train_set, test = load_cache(train_cache), load_cache(test_cache)
    check_caches(policy, train_set, test)
    if own_problems:  # a count the test split cannot give failed after the whole training, its table lost
        countdown.generate_problems("test", own_problems, seed=0)
    lm, tokenizer = load_checkpoint(policy)
    if int(lm.config.hidden_size) != train_set.hidden_size:
        raise ValueError(f"--policy {policy} (C={lm.config.hidden_size}) and the rollout caches "
                         f"(C={train_set.hidden_size}) come from different policies")
    frozen = load_checkpoint(policy)[0] if cfg.kl_coef else None
    reflective = ReflectiveModel(lm)
    reader = FeatureReader(lm, tokenizer, countdown.prompt_text, [reflective.feature_layer])
    train_problems = cache_problems(train_set)
    examples = rollout_examples(train_set, train_problems, reader) + solution_examples(train_problems, reader, cfg.reference_solutions)
    check_examples(examples, cfg.batch)
    test_paths = paths_of(test, cache_problems(test))
    started = time.perf_counter()
    before, _ = evaluate(reflective, test, test_paths, reader)
    log = train(reflective, frozen, examples, reader.pad_id, cfg, progress)
    after, after_probs = evaluate(reflective, test, test_paths, reader)
    own: dict[str, float] = {}
    if save_dir is not None or own_problems:
        with tempfile.TemporaryDirectory() as scratch:
            folder = save_dir or Path(scratch) / "tuned"
            reflective.save_pretrained(folder, tokenizer)
            own = own_samples(folder, own_problems, test.n, progress) if own_problems else {}
    return {"own": own, "config": asdict(cfg), "train_examples": len(examples), "train_correct": sum(e.correct for e in examples),
            "seconds": time.perf_counter() - started, "before": before, "after": after,
            "loss_first": log[0]["loss"], "loss_last_50": sum(r["loss"] for r in log[-50:]) / min(50, len(log)),
            "after_step_scores": after_probs.tolist()}


def summary(result: dict[str, Any], n: int) -> str:
    keys = ["heldout_fc/diff_prob", "heldout_fc/within_auc", "pass@1", f"sprm_bon@{n}", f"sprm_wmaj@{n}",
            f"conf_bon@{n}", f"maj@{n}", f"pass@{n}"]
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for when in ("before", "after"):
        lines.append(f"| {when} | " + " | ".join(f"{result[when].get(k, float('nan')):.3f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; our own input errors (ValueError, FileNotFoundError: a bad setting, a
    missing or damaged cache, caches of another policy) print "error: <message>" on stderr and
    give exit code 2; Ctrl-C (or SIGTERM) once the arguments are parsed: one line saying what is
    kept (`interrupt_hint`)."""
    return run_command(probe_command, argv)


def interrupt_hint(save: Path | None, out: Path | None, out_before: FileId | None) -> str:
    """What a Ctrl-C says is kept at that moment; out_before: --out's `file_id` when the command
    began. --save must be new or empty, so a --save with files holds this run's tuned model (saved
    atomically after training, before --own-problems samples); --out is written last, atomically."""
    if out is not None and file_id(out) != out_before:
        return f"the probe finished: {out} was written"
    if save is not None and save.is_dir() and any(save.iterdir()):
        return (f"the tuned model saved in {save} is kept, the results were not written; rerun the same command "
                f"with another --save (or {save} emptied) to run the probe again")
    kept = f" ({out} is kept as it was)" if out is not None and out_before is not None else ""
    return f"nothing was written{kept}; rerun the same command to run the probe again"


def probe_command(argv: Sequence[str] | None = None) -> int:
    """Parse argv, then `probe` with Ctrl-C and SIGTERM reported in one line (`interrupt_hint`)."""
    d = BackboneTuneConfig()
    ap = argparse.ArgumentParser(prog="python -m experiments.probe_backbone_verifier", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=Path, default=Path("outputs/checkpoints/tiny-countdown/final"))
    ap.add_argument("--train", type=Path, required=True, help="train-split rollout cache (.pt)")
    ap.add_argument("--test", type=Path, required=True, help="held-out rollout cache (.pt)")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    ap.add_argument("--save", type=Path, default=None, help="save the tuned reflective model in this folder")
    ap.add_argument("--own-problems", type=nonnegative_int, default=0,
                    help="the tuned model samples its own rollouts of this many test problems; its head ranks them")
    for name in ("steps", "batch", "reference_solutions"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    ap.add_argument("--seed", type=seed_int, default=d.seed, help="torch seed of the training")
    for name in ("backbone_lr", "head_lr", "grad_scale", "kl_coef", "lm_coef"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    ap.add_argument("--loss", default=d.loss, choices=SPR_MODES, help="scorers.spr_loss mode")
    ap.add_argument("--ref-fp32", action="store_true",
                    help="the KL term's frozen forward in fp32 (default: bf16 autocast where the CPU has bf16 matmuls, "
                         "policies/bf16_support.py, else fp32)")
    ap.add_argument("--threads", type=positive_int, default=None)
    args = ap.parse_args(argv)
    if args.out is not None:  # checked before training, which --out / --save would fail only after
        check_file_target(args.out, "--out", "probe.json")
    if args.save is not None:
        check_folder_target(args.save, "--save")
        if args.save.is_dir() and any(args.save.iterdir()):  # save_pretrained replaces it (a model, caches)
            ap.error(f"--save {args.save} is not empty; give a new or empty folder")
    hint = functools.partial(interrupt_hint, args.save, args.out, None if args.out is None else file_id(args.out))
    with interrupt_reported(hint):  # from here --save is new or empty (`interrupt_hint` reads it so)
        return probe(args)


def probe(args: argparse.Namespace) -> int:
    """Check the config before anything is loaded, run the probe, print the tables, write --out."""
    d = BackboneTuneConfig()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BackboneTuneConfig(args.steps, args.batch, args.backbone_lr, args.head_lr, args.grad_scale, args.loss,
                             args.kl_coef, args.reference_solutions, args.seed, args.lm_coef,
                             False if args.ref_fp32 else d.ref_bf16)
    result = run(args.policy, args.train, args.test, cfg, save_dir=args.save, own_problems=args.own_problems)
    n = load_cache(args.test).n
    print(summary(result, n))
    if result["own"]:
        keys = ["own_fc/diff_prob", "own_fc/within_auc", "pass@1", f"sprm_bon@{n}", f"conf_bon@{n}", f"maj@{n}", f"pass@{n}"]
        print(f"\nthe tuned model's own samples ({args.own_problems} test problems x {n}):")
        print("| " + " | ".join(keys) + " |\n|" + "---:|" * len(keys))
        print("| " + " | ".join(f"{result['own'].get(k, float('nan')):.3f}" for k in keys) + " |")
    if args.out:  # atomic: a Ctrl-C while writing leaves no half file (after_step_scores: the held-out step scores)
        write_atomic(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
