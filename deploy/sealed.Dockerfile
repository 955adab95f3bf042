# The sealed build as an image, for the Job (smlaas-build-load, in the build.yaml that
# `smlaas deploy --k8s-out DIR` writes) that copies it onto the smlaas-build volume. Build it
# with the sealed directory as the context, never the plaintext build or the owner's keys:
#
#   docker build -f deploy/sealed.Dockerfile -t TAG build/sealed
#
# where TAG is the sealed image `--k8s-out` printed (its tag is the first 12 hex digits of
# plan.json's SHA-256, so the Job cannot copy another build by mistake). The image holds only
# what the serving machines see anyway: the sealed stages (AES-256-GCM; the keys stay with the
# owner) and plan.json (the model's structure and sizes, in plaintext).
FROM busybox:1.36
COPY . /sealed/
# Non-root, like the Job that runs it (its securityContext names the same uid/gid).
USER 10001:10001
