"""`flywheel demo`: the seven steps of the loop (ARCHITECTURE.md, "The loop"), for real, in one process.

Like `flywheel up`, every service runs in this process (one ASGI app on a free port, one broker, one
embedded ClickHouse) against a local Apache Kafka the demo starts and stops. The demo then acts as
the people and apps around the platform, through the services' doors and events only: an operator
registers data and asks for training, approves promotions; an app calls the gateway with the
openai client; reviewers give feedback. What the services do in between (train, evaluate, gate,
load adapters, store logs, raise alerts, retrain) is theirs. A step the platform cannot complete
is reported as failed with the reason; nothing is filled in by the demo.

A second run in the same FLYWHEEL_HOME reuses what exists: datasets of the same content, the
training job of the same data and hyperparameters (the trainer answers it as done), adapters and
their stages in the registry.

The package, by what each module holds: command.py, the `flywheel demo` command (a local Kafka, the
loop, the report); process.py, the process every service runs in, configured for the demo; doors.py,
what the demo's people do through the platform's doors; driver.py, the seven steps; report.py, the
summary and the HTML page; recipe.py and data/, the model, the data and the recipe.

Like the CLI, it is a composition above the services: it reaches a service only through its `app` or
`cli` module, found by name (tests/unit/test_boundaries.py checks), and no service imports it.
"""
