"""The vision evaluation (issue 16): a generated corpus with ground truth, degraded like scans,
read through POST /v1/vision/extract on a real server, scored into docs/vision-eval.md."""
