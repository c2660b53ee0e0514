"""The study, as its steps: adapters -> extract -> saes -> measure -> publish (``run`` reads top to bottom).

- :mod:`~lorascope.study.cache`: stage folders keyed by a hash of their inputs, the run's state;
- :mod:`~lorascope.study.adapters`: train or load the adapters (:class:`Adapter`);
- :mod:`~lorascope.study.extract`: the activation store of base and adapters (:class:`Extracted`);
- :mod:`~lorascope.study.saes`: ``train_sae_job`` (one SAE; also behind ``train-sae`` and
  ``train-saes-distributed``) and the study's adapter and reference SAEs (:class:`StudySAEs`);
- :mod:`~lorascope.study.analysis`: every statistic of one (layer, adapter), model-free;
- :mod:`~lorascope.study.splice`: the splice test (needs the model);
- :mod:`~lorascope.study.measure`: the measure stage (analysis, contexts, LoRA and reference rows, splice);
- :mod:`~lorascope.study.publish`: the results table, its mirror in output_dir/results, the report;
- :mod:`~lorascope.study.run`: ``run(config)`` and the early input checks.
"""

from lorascope.study.run import RunResult, check_inputs, run
from lorascope.study.saes import SAEJob, evaluate_held_out, train_sae_job, trainer_config

__all__ = ["RunResult", "SAEJob", "check_inputs", "evaluate_held_out", "run", "train_sae_job", "trainer_config"]
