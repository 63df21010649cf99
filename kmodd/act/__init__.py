"""Doing: a `request` performed (`perform`) through autoinstall and the other changes
(`manage`), with builds, installs, initrds and drivers, each reported as an `outcome`."""
