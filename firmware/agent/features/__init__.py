# The optional features: one module per site.toml section, agent/features/<section>.py
# (docs/architecture.md, "Feature contract"). agent/boot.py FEATURES names them in start order
# (tests/test_static.py checks it against this folder) and features(cfg) says which a site runs;
# the hub (agent/app.py) imports those and calls start(agent), which creates the feature's tasks
# and returns an object whose status() is its @status value under the section's name. A section
# in boot.EARLY also has boot(agent, persisted), run before the relays are driven (the override
# switch: a lockout holds the load off from the first relay write). Optional: stop() on that
# object, called when the agent is stopped from the console (agent/stopped.py). This package
# itself holds nothing: it stays loaded on every site.
