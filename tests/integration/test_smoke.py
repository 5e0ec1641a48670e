from durable_celery import Await, Done, Sleep
from durable_celery.testing import drain


def test_pipeline_runs_to_done(durable):
    wf = durable.workflow("smoke")

    @wf.step
    def one(ctx):
        ctx.state["n"] = 1
        return None

    @wf.step
    def two(ctx):
        return Sleep(seconds=30)

    @wf.step
    def three(ctx):
        return Await("go")

    @wf.step
    def four(ctx):
        return Done({"n": ctx.state["n"], "go": ctx.signals[0].payload})

    wid = wf.start()
    drain(durable)
    assert durable.get_workflow(wid).status == "awaiting"
    durable.signal(wid, "go", 7)
    drain(durable)
    assert durable.wait_result(wid, timeout=1) == {"n": 1, "go": 7}
