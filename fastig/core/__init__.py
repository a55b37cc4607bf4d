"""The engine, independent of any attribution method: quadrature rules, paths, batched evaluation."""
