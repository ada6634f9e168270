"""The top of the stack: processes that run the Serve app (serving.launch) and the demo that
drives it through the client SDK (serving.demo). It may import graph, deployments and biprompt;
nothing below it imports it (the import-linter contracts in pyproject.toml)."""
