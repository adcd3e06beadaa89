"""The experiment tools built on the engine: ``compare`` and ``sweep`` (plan → execute →
collect → write), their executors, summaries, ranking and the report page, with the
commands' Typer front-ends beside their logic."""
