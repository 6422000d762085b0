"""One script per DVC stage: parse params and paths, call the library in model/, write outputs."""
