"""modules/scripts.py: ScriptRunner, as process_images calls it (the always-on scripts' hooks with
their slice of p.script_args). An empty runner runs nothing."""


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []

    def _run(self, name, p, *args, **kwargs):
        for script in self.alwayson_scripts:
            hook = getattr(script, name, None)
            if hook is not None:
                hook(p, *args, *p.script_args[script.args_from:script.args_to], **kwargs)

    def before_process(self, p):
        self._run("before_process", p)

    def process(self, p):
        self._run("process", p)

    def process_batch(self, p, **kwargs):
        self._run("process_batch", p, **kwargs)

    def postprocess(self, p, processed):
        self._run("postprocess", p, processed)
