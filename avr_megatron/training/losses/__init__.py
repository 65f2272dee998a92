"""Loss step functions for the generic training loop: each objective supplies Megatron's
`forward_step(data_iterator, model) -> (output, loss_func)`; the loop does the rest."""
