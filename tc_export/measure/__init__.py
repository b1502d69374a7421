"""Measuring: speed side by side (``bench``, ``bench_job``), sweeps (``sweep``), their results and the report page
(``bench_report``, ``report``), the eager ToMe baseline (``reference_tome``) and schedule search (``tune``)."""
