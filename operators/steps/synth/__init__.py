"""Phase 2 steps: conversational synthesis (labeling, seeds, evolution, responses, diagnosis)."""
