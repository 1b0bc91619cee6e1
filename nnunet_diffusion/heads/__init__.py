"""One module per paper: the method as plain torch (training loss, sampling), no nnU-Net imports."""
