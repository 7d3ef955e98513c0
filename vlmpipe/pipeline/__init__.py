"""The bodies of the model stages, one module per stage: ``stages/<stage>.py`` reads the params
and calls ``vlmpipe.pipeline.<stage>.run_stage``. Each training body has one shape: build → TrainTask →
fit → save → metrics, returning the loop's ``FitResult``."""
