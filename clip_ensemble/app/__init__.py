"""The Gradio app's logic, without Gradio (`app.py` at the repository root draws the page).

- `sessions`: one gate per browser session, and the server's store of them;
- `uploads`: checking what visitors type and upload (labels, images, zips, dataset ids);
- `service`: the shared ensemble that serves every session (calibrate, evaluate, classify);
- `keeping`: a session's gate kept in the browser, downloaded, pushed and loaded back (through the library's one
  loader, `clip_ensemble.models.saved_gate`, plus the app's size caps and the server's backbones);
- `wording`: verdicts in plain words.
"""
