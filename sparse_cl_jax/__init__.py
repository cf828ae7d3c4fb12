"""sparse_cl_jax: sparse continual learning in JAX."""
