"""Diffusers pipeline classes for Phased DMD students that diffusers' own pipelines cannot run
(more than two Wan experts, two or more Qwen-Image experts, re-noising steps on Wan). Each
module here is copied as it is into an exported pipeline folder, beside model_index.json, and
loaded by diffusers' custom-pipeline mechanism (distill/diffusers_pipeline.py writes the folder);
they import only diffusers and torch, and each other relatively."""
