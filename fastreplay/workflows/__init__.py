"""What is built on the algorithm: validation by retraining (lds), the replay-free screen
(smoothness) and the benchmarks (bench)."""
