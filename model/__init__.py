"""The library behind the pipeline stages and the server: data, tokenizer, model, training, serving."""
