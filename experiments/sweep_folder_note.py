"""A Hydra callback that notes a sweep's folder in the process that launches its jobs, so a
Ctrl-C or SIGTERM there names it: `interrupted: ...; rerun the same command with
hydra.sweep.dir=outputs/sweeps/2026-12-07_04-51-45 (its folder) to go on`
(`experiments.cli_errors.hydra_rerun_hint`).

A job notes the folder itself (`note_hydra_job`), but under a launcher that runs the jobs in other
processes (`hydra/launcher=local`: joblib workers) the message is printed by the launching
process, which knew nothing of it: the hint said "rerun the same command", and an ad-hoc sweep
then started over in a new timestamped folder. So did a Ctrl-C before the first job started.
search.yaml and train.yaml register it (`hydra.callbacks.sweep_folder`).

Tests: `.venv/bin/pytest tests/test_search_cli.py -k sweep_folder`.
"""
from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments.cli_errors import note_sweep_dir


class SweepFolderNote(Callback):
    """on_multirun_start: the sweep's folder noted for the Ctrl-C hint (none with out_dir=, a
    one-job sweep into its own folder, as `note_hydra_job`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("out_dir"):
            note_sweep_dir(str(config.hydra.sweep.dir))
