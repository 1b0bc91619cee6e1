"""The modules nnU-Net's predictor calls (sampling inside forward) and the predict-time options."""
