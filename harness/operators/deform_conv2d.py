"""deform_conv2d operator registration (in progress: conv-family engineer)."""
