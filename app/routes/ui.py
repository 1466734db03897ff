"""The live page at `/`: pick streams and watch their raw and smoothed values move, from the
event stream. Plain files served from the package (app/static), the chart library vendored in
app/static/vendor: nothing to build, nothing fetched from elsewhere."""

from importlib.resources import files

from fastapi import APIRouter
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

router = APIRouter(include_in_schema=False)


def static_files() -> StaticFiles:
    """app/static, to mount at /static."""
    return StaticFiles(packages=[("app", "static")])


@router.get("/")
async def live_page() -> FileResponse:
    """The live page."""
    page = files("app").joinpath("static", "index.html")
    return FileResponse(str(page), media_type="text/html", headers={"Cache-Control": "no-cache"})
