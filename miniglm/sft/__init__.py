"""SFT data: record formats, chat templates, rendering to ids + labels."""
