"""The Hydra app: config schemas and cross-group rules (config), one run from a composed config (run),
the user-error boundary (cli), and the run record (record). The library beneath never imports this."""
