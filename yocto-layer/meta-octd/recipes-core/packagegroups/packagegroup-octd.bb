SUMMARY = "octd appliance: the daemon and what it needs at run time"
DESCRIPTION = "Add to an image with IMAGE_INSTALL:append = \" packagegroup-octd\"."
HOMEPAGE = "https://octd.example.org"
BUGTRACKER = "https://octd.example.org/issues"
SECTION = "science"
LICENSE = "MIT"

PACKAGE_ARCH = "${TUNE_PKGARCH}"

inherit packagegroup

RDEPENDS:${PN} = "ca-certificates \
                  octd \
                  tzdata \
                  "
