"""The `gpufleet` command line on top of everything: plan, estimate, catalogue, up, status, train,
serve, demo (``gpufleet.cli``), the tables it prints (``gpufleet.render``) and the demo."""
