"""What kmodd knows it did: the records in state.db (`store`), the states a source can
be in for a kernel (`states`) and the lines `kmodctl status` shows (`report`)."""
