"""Run planning before a GPU is booked: compute, time, cost, memory per ZeRO stage (`vit-plan`)."""
