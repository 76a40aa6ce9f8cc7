"""The analyses of the paper's §3.3-§3.6 (SPEC §4).

* :mod:`~rapa.analysis.similarity`: filter similarity across tiles (Fig. 6).
* :mod:`~rapa.analysis.reduce`: reduction to one kernel matrix per layer (Table 3);
  the function is ``rapa.analysis.reduce.reduce`` (not re-exported here, where the name
  is the module).
* :mod:`~rapa.analysis.attack`: FGSM / EOT / PGD robustness against SNR (Fig. 7).
* :mod:`~rapa.analysis.more_tiles`: error curves of runs with more tiles (Fig. 5).
* :mod:`~rapa.analysis.voting`: a run's voting errors and one pass against a vote per image.

Each analysis of a run computes its record (``reduce_run``, ``attack_runs`` /
``attack_record``, ``similarity_run``, ``voting_run``) and saves it (``save_*``) as the result
file :mod:`rapa.rundir` names, for the commands and the sweeps alike.
"""

from rapa.analysis.attack import (ATTACKS, DEFAULT_SNRS, accuracy_at, fgsm, gap_reduction, input_gradient,
                                  pgd, plot_robustness, robustness_curve, snr_epsilon)
from rapa.analysis.more_tiles import more_tiles_curves, plot_more_tiles
from rapa.analysis.reduce import METHODS, choose_tiles, maxpool_win_counts, reduce_errors
from rapa.analysis.similarity import filter_similarity, plot_filters, tile_correlation

__all__ = ["ATTACKS", "DEFAULT_SNRS", "METHODS", "accuracy_at", "choose_tiles", "fgsm", "filter_similarity",
           "gap_reduction", "input_gradient", "maxpool_win_counts", "more_tiles_curves", "pgd", "plot_filters",
           "plot_more_tiles", "plot_robustness", "reduce_errors", "robustness_curve", "snr_epsilon",
           "tile_correlation"]
