"""keras-tuner's Bayesian oracle, an evolutionary one, and the tuner, with what karyo's searches need on top.

* ``ResumableOracle`` (shared by both oracles): state files written atomically; a resume repaired
  where a kill between two writes left the oracle and a trial disagreeing; the worker and the
  seconds of every trial kept in its state.
* ``SearchOracle``: keras-tuner's Bayesian oracle with that, its Gaussian process' restart points
  drawn from (seed, trial number), so a resumed search chooses what an uninterrupted one would.
* ``EvolutionOracle``: a genetic algorithm (BioTune's search), with that, its population and random
  generator in its state.
* ``SearchTuner``: each trial's error recorded where a distributed search's chief can read it, a
  failed trial shown in one line, and the fail-fast rule (the first trials all failed: a broken
  setup, not a bad value) raised as keras-tuner's own ``FatalError``.

Only keras-tuner's public names are imported. The methods overridden to write files atomically and
to repair a resume (``save``, ``_save_trial``, ``reload``) are keras-tuner's own hooks; some have no
public name.
"""

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import keras_tuner
import numpy as np
from keras_tuner import synchronized
from keras_tuner.engine.trial import TrialStatus

from karyo.atomic import atomic_write_text
from karyo.errors import KaryoError

#: Stop a search whose first this-many trials all failed: a broken setup, not a bad value.
FAIL_FAST = 3
#: A worker's record of one trial (its error, its seconds), beside keras-tuner's ``trial.json``.
RECORD_NAME = "karyo_trial.json"
#: The statuses of a trial that has ended.
ENDED = (TrialStatus.COMPLETED, TrialStatus.FAILED)


def search_role():
    """``standalone``, ``chief`` or ``worker``, from keras-tuner's environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "standalone"
    missing = [v for v in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if not os.environ.get(v)]
    if missing:
        raise KaryoError(f"KERASTUNER_ORACLE_IP is set but {' and '.join(missing)} is not: a "
                         f"distributed search needs all three (see karyo.experiments.tuning)")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def check_search_extras():
    """Fail with one clear message if keras-tuner cannot search here (SPEC 8): its Bayesian
    oracle needs scipy and scikit-learn, and on TensorFlow >= 2.21 every trial fails without
    tensorboard."""
    try:
        import scipy  # noqa: F401
        import sklearn  # noqa: F401
        import tensorboard  # noqa: F401
    except ImportError as exc:
        raise KaryoError(f"the Bayesian search needs keras-tuner with its extras ({exc.name} is "
                         f"missing): pip install 'keras-tuner[bayesian]' tensorboard") from None


def trial_record_path(project_dir, trial_id):
    """Where a worker records one trial's error and seconds."""
    return Path(project_dir) / f"trial_{trial_id}" / RECORD_NAME


def trial_order(trial_id):
    """Sort key of a trial id: numbers in numeric order."""
    return (0, int(trial_id)) if str(trial_id).isdigit() else (1, str(trial_id))


def one_line(exc_or_text):
    """The last meaningful line of an error or traceback, without keras-tuner's wrapper name."""
    if isinstance(exc_or_text, BaseException):
        text = f"{type(exc_or_text).__name__}: {exc_or_text}".strip()
    else:
        lines = [ln.strip() for ln in str(exc_or_text or "").splitlines() if ln.strip()]
        text = lines[-1] if lines else ""
    for prefix in ("keras_tuner.src.errors.", "keras_tuner.errors."):
        text = text.replace(prefix, "")
    if text.startswith("FailedTrialError: "):
        text = text[len("FailedTrialError: "):]
    return " ".join(text.split())[:500]


class ResumableOracle:
    """What karyo adds to a keras-tuner oracle, shared by :class:`SearchOracle` and
    :class:`EvolutionOracle` (put it first among the bases): atomic state files, a repaired
    resume, and the worker and the wall-clock seconds of every trial recorded in its state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.karyo = {"tuner": {}, "started": {}, "seconds": {}}

    @synchronized
    def create_trial(self, tuner_id):
        resent = tuner_id in self.ongoing_trials
        trial = super().create_trial(tuner_id)
        if trial.status == TrialStatus.RUNNING and not resent:
            self.karyo["tuner"][trial.trial_id] = tuner_id
            self.karyo["started"][trial.trial_id] = time.time()
            self.save()
        return trial

    @synchronized
    def end_trial(self, trial):
        started = self.karyo["started"].get(trial.trial_id)
        if started is not None:
            self.karyo["seconds"][trial.trial_id] = round(time.time() - started, 3)
        super().end_trial(trial)

    def get_state(self):
        return {**super().get_state(), "karyo": self.karyo}

    def set_state(self, state):
        super().set_state(state)
        saved = state.get("karyo") or {}
        self.karyo = {k: dict(saved.get(k) or {}) for k in ("tuner", "started", "seconds")}

    def save(self):
        atomic_write_text(self._get_oracle_fname(), json.dumps(self.get_state()))

    def _save_trial(self, trial):
        path = Path(self._get_trial_dir(trial.trial_id)) / "trial.json"
        atomic_write_text(path, json.dumps(trial.get_state()))

    def reload(self):
        super().reload()
        # Trials in the order they were created, not the file system's (the Gaussian
        # process is fitted on them in this order).
        self.trials = dict(sorted(self.trials.items(), key=lambda item: trial_order(item[0])))
        # A kill between writing a trial's file and the oracle's leaves the two disagreeing:
        # a started trial the oracle does not know is running (it would stay unfinished
        # forever) or an ended one it still lists as running (it would be redone).
        queue = [t for t in self._retry_queue if self.trials[t].status not in ENDED]
        for trial_id in sorted(self.trials, key=trial_order):
            status = self.trials[trial_id].status
            if status in ENDED and trial_id not in self.end_order:
                self.end_order.append(trial_id)
            elif status == TrialStatus.RUNNING and trial_id not in queue:
                queue.append(trial_id)
        self._retry_queue = queue


class SearchOracle(ResumableOracle, keras_tuner.oracles.BayesianOptimizationOracle):
    """keras-tuner's Bayesian oracle, with atomic state files, a repaired resume, and the
    worker and the wall-clock seconds of every trial recorded in its state."""

    def populate_space(self, trial_id):
        # keras-tuner draws the Gaussian process' restart points from a RandomState it does
        # not save: a resumed search would draw them anew from the seed and choose other
        # values than an uninterrupted one. Drawn from (seed, trial number), they do not
        # depend on whether the search was interrupted.
        self._random_state = np.random.RandomState([int(self.seed), trial_order(trial_id)[1]])
        return super().populate_space(trial_id)


class EvolutionOracle(ResumableOracle, keras_tuner.Oracle):
    """A genetic algorithm over the search space, as BioTune searches its genome.

    Every hyperparameter is handled as a number in [0, 1] (keras-tuner's own ``value_to_prob`` /
    ``prob_to_value``; for BioTune's genes it is the gene itself). The first ``population_size``
    trials are drawn at random. Each later trial is a child: two parents chosen by tournament
    (the better of ``tournament`` random members) from the population, which is the best
    ``population_size`` completed trials so far (fitness: the tuner's objective, the validation
    loss, lower is better; failed trials never enter it); uniform crossover, then each gene
    mutated with probability ``mutation_rate`` (default one gene per child) by a Gaussian step
    of ``mutation_scale``, kept in [0, 1]. One child per trial (a steady-state GA), so a trial
    never waits for a generation to finish, alone or in a distributed search.

    ``phenotype`` (optional) maps a trial's values to what the trial actually trains: genomes
    with the same phenotype (BioTune's genomes in which no gene exceeds the threshold all train
    the head alone) are bred again instead of being run twice.

    The population, the generation (children bred // ``population_size``), the random
    generator's state and each trial's parents are in the oracle's state: a search killed and
    resumed breeds the same children as one never interrupted.
    """

    def __init__(self, *args, population_size=6, tournament=2, mutation_rate=None, mutation_scale=0.2,
                 phenotype=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.phenotype = phenotype
        self.population_size, self.tournament = int(population_size), int(tournament)
        self.mutation_rate, self.mutation_scale = mutation_rate, float(mutation_scale)
        self.evolution = {"population": [], "generation": 0, "bred": 0, "parents": {},
                          "rng": np.random.default_rng(int(self.seed)).bit_generator.state}

    def _genes(self):
        return [hp for hp in self.hyperparameters.space]

    def _unit(self, trial):
        values = trial.hyperparameters.values
        return {hp.name: float(hp.value_to_prob(values[hp.name])) for hp in self._genes() if hp.name in values}

    def _rank(self):
        """The population: the best ``population_size`` completed trials (ties: the earlier)."""
        done = [t for t in self.trials.values() if t.status == TrialStatus.COMPLETED and t.score is not None
                and np.isfinite(t.score)]
        sign = 1.0 if self.objective.direction == "min" else -1.0
        done.sort(key=lambda t: (sign * float(t.score), trial_order(t.trial_id)))
        return [{"trial_id": t.trial_id, "score": float(t.score), "genes": self._unit(t)}
                for t in done[:self.population_size]]

    def populate_space(self, trial_id):
        rng = np.random.default_rng()
        rng.bit_generator.state = self.evolution["rng"]
        genes = self._genes()
        population = self.evolution["population"]
        parents = []
        seen = set()
        if self.phenotype is not None:
            seen = {self.phenotype(t.hyperparameters.values) for t in self.trials.values() if t.trial_id != trial_id}
        for _ in range(100):  # a child that repeats an earlier trial is bred again
            if trial_order(trial_id)[1] < self.population_size or len(population) < 2:
                unit = {hp.name: float(rng.random()) for hp in genes}
            else:
                parents = [self._tournament(rng, population) for _ in range(2)]
                rate = self.mutation_rate if self.mutation_rate is not None else 1.0 / max(1, len(genes))
                unit = {}
                for hp in genes:
                    a, b = (p["genes"].get(hp.name, 0.5) for p in parents)
                    gene = a if rng.random() < 0.5 else b
                    if rng.random() < rate:
                        gene += rng.normal(0.0, self.mutation_scale)
                    unit[hp.name] = float(np.clip(gene, 0.0, 1.0))
            values = {hp.name: hp.prob_to_value(unit[hp.name]) for hp in genes}
            if not self._duplicate(values) and (self.phenotype is None or self.phenotype(values) not in seen):
                break
        else:
            return {"status": TrialStatus.STOPPED, "values": None}
        if parents:
            self.evolution["bred"] += 1
            self.evolution["parents"][trial_id] = [p["trial_id"] for p in parents]
        self.evolution["generation"] = self.evolution["bred"] // max(1, self.population_size)
        self.evolution["rng"] = rng.bit_generator.state
        return {"status": TrialStatus.RUNNING, "values": values}

    def _tournament(self, rng, population):
        picks = rng.choice(len(population), size=min(self.tournament, len(population)), replace=False)
        return population[int(min(picks))]  # the population is sorted best first

    @synchronized
    def end_trial(self, trial):
        super().end_trial(trial)
        self.evolution["population"] = self._rank()
        self.save()

    def get_state(self):
        return {**super().get_state(), "evolution": self.evolution,
                "evolution_settings": {"population_size": self.population_size, "tournament": self.tournament,
                                       "mutation_rate": self.mutation_rate,
                                       "mutation_scale": self.mutation_scale}}

    def set_state(self, state):
        super().set_state(state)
        if state.get("evolution"):
            self.evolution = state["evolution"]

    def reload(self):
        super().reload()
        # A kill between a trial's end and the oracle's save: the population is what the
        # completed trials say it is.
        self.evolution["population"] = self._rank()


class SearchTuner(keras_tuner.Tuner):
    """keras-tuner's ``Tuner`` (with a :class:`SearchOracle` it is ``BayesianOptimization``)
    that records each trial's error where the chief can read it, and stops a search whose
    first trials all failed.

    Quiet (``quiet=True``), a failed trial shows its one-line error only: keras-tuner prints
    the traceback of every failed trial to ``sys.stderr`` (unless its debug switch, which
    is not public, is off), so each trial's standard error is held and, after the trial,
    passed on without what was written after the trial raised.
    """

    def __init__(self, *args, progress=None, quiet=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress
        self.quiet = quiet
        self.ran = []
        self.held = None  # (the real sys.stderr, the buffer, where the trial raised)

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        if self.quiet and self.held is None:
            self.held = [sys.stderr, io.StringIO(), None]
            sys.stderr = self.held[1]

    def release_stderr(self):
        """Give ``sys.stderr`` back, passing on what the trial wrote before it raised."""
        if self.held is None:
            return
        real, buffer, raised_at = self.held
        self.held = None
        sys.stderr = real
        real.write(buffer.getvalue()[:raised_at])
        real.flush()

    def run_trial(self, trial, *args, **kwargs):
        started = time.time()
        record = {"trial_id": trial.trial_id, "tuner": self.tuner_id, "error": ""}
        try:
            return super().run_trial(trial, *args, **kwargs)
        except Exception as exc:
            record["error"] = one_line(exc)
            print(f"karyo tune: trial {trial.trial_id} failed: {record['error']}",
                  file=sys.stderr)
            if self.held is not None:
                self.held[2] = len(self.held[1].getvalue())
            raise
        finally:
            record["seconds"] = round(time.time() - started, 3)
            self.ran.append(record)
            with contextlib.suppress(OSError):
                atomic_write_text(trial_record_path(self.project_dir, trial.trial_id),
                                  json.dumps(record))

    def on_trial_end(self, trial):
        self.release_stderr()
        super().on_trial_end(trial)
        if self.progress is not None:
            self.progress.update(1)
        if search_role() != "standalone":
            return  # a worker cannot see the other trials
        statuses = [t.status for t in self.oracle.trials.values()]
        failed = statuses.count(TrialStatus.FAILED)
        if failed >= FAIL_FAST and TrialStatus.COMPLETED not in statuses:
            raise SearchFailed(f"the first {failed} trials all failed")

    def save(self):
        if not self._is_worker():
            self.oracle.save()
        atomic_write_text(self._get_tuner_fname(), json.dumps(self.get_state()))


class SearchFailed(keras_tuner.errors.FatalError):
    """The fail-fast rule: keras-tuner's own "stop the search" error, raised from the search
    loop; :func:`tune` catches it and reports the trials' errors as a ``KaryoError``."""
